"""python -m fedgan.flower --config CONFIG.json --supernodes N --out DIR [--tls]: see launcher.py."""
import sys

from fedgan.flower.launcher import main

sys.exit(main())
