import sys

from bonefrac.cli.main import main

sys.exit(main())
