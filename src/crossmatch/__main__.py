import sys

from crossmatch.cli.main import main

sys.exit(main())
