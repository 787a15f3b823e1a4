import sys

from qn_cli.main import main

sys.exit(main())
