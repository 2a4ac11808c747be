"""Mosaic GPU backend (``implementation="mosaic_gpu"``): Hopper kernels in the
FlashAttention-3 design (a producer warpgroup streaming blocks by TMA, two consumer
warpgroups running ``wgmma`` from shared memory), written as ``plgpu.kernel`` programs
so that Mosaic GPU's interpret mode runs them off a GPU."""
