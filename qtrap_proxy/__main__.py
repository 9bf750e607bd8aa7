import sys

from qtrap_proxy.cli import main

sys.exit(main())
