import sys

from qtrap_sim.cli import main

sys.exit(main())
