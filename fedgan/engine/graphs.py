"""Local steps replayed from CUDA graphs."""
from __future__ import annotations

import torch

Tensor = torch.Tensor


class CudaGraphStep:
    """A local step replayed from a CUDA graph: one launch where the eager step makes hundreds.

    A small GAN's step on a GPU is bound by kernel launches, not arithmetic, most at few clients: with many, the
    kernels fill the GPU and replays gain little (benchmarks/RESULTS.md). The first WARMUP calls run eagerly on a side stream (lazy initialisation must
    happen outside a capture, as torch's CUDA-graph notes say); the next call records `body` once and every
    call replays it, in this round and the next ones (LocalTrainer). A replay runs the recorded kernels on the same
    memory, so the result is the eager one: `body` must not sync with the host, must keep its state in tensors
    that outlive the calls (parameters, Adam state, buffers, loss sums, updated in place), and takes its inputs from
    static buffers each call fills.
    """

    WARMUP = 2

    def __init__(self, body, pool: tuple[int, int] | None = None):
        """`pool`: a memory pool shared with graphs replayed before or after this one, never in between."""
        self.body, self.pool = body, pool
        self.calls = 0
        self.inputs: list[Tensor] | None = None
        self.graph: torch.cuda.CUDAGraph | None = None

    def __call__(self, *inputs: Tensor) -> None:
        if self.inputs is None:
            self.inputs = [torch.empty_like(x, memory_format=torch.contiguous_format) for x in inputs]
        for buffer, x in zip(self.inputs, inputs):
            buffer.copy_(x)
        if self.calls < self.WARMUP:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.body(*self.inputs)
            torch.cuda.current_stream().wait_stream(side)
        else:
            if self.graph is None:
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph, pool=self.pool):
                    self.body(*self.inputs)
            self.graph.replay()
        self.calls += 1
