import sys

from rpgrl.integrations.verl_cpu.run import main

sys.exit(main())
