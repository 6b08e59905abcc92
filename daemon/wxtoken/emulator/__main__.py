import sys

from wxtoken.emulator.server import main

sys.exit(main())
