import sys

from detr_ptq.cli import main

sys.exit(main())
