import sys

from hetfl.cli.main import main

sys.exit(main())
