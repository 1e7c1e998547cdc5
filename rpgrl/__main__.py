from rpgrl.cli import main

raise SystemExit(main())
