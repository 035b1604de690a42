import sys

from gmpq.cli import main

sys.exit(main())
