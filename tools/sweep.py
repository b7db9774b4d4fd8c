#!/usr/bin/env python
"""Sweeps and ablations over ``arsr fit`` overrides (also installed as ``arsr-sweep``); see arsr/sweep.py.

    python tools/sweep.py --config recipes/quickstart.yaml --out_dir sweeps/posenc \\
        --grid model.init_args.transformer.init_args.pos_enc=arsr.components.posenc.SARoPE,arsr.components.posenc.AbsolutePerScale \\
        --trainer.max_steps 200
    python tools/sweep.py --config recipes/quickstart.yaml --out_dir sweeps/lr --random 8 --seed 0 \\
        --range model.init_args.optimizer.init_args.lr=1e-4:3e-3:log --grid data.init_args.batch_size=4,8
"""

import sys

from arsr.sweep import main

if __name__ == "__main__":
    sys.exit(main())
