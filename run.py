"""qdrift entry point: `python run.py model=pixart quant=svdquant_w3a4 sampler=dpmpp calib.num_runs=5`.

The same as `qdrift run ...` (qdrift/app.py); the configs live in qdrift/conf (conf/ links there).
"""
from qdrift.app import main

if __name__ == "__main__":
    main()
