from rpgrl.cli import entry

entry()
