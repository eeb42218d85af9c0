"""The Triton kernels of K clients' convolutions (fedgan/engine/triton_conv.py) and the form that uses them.

On a CPU they run on Triton's interpreter (conftest sets TRITON_INTERPRET), which computes float32 only; on a GPU
(FEDGAN_TEST_DEVICE=cuda) they are compiled, and bfloat16 is checked too.
"""
import pytest
import torch
import torch.nn.functional as F

import fedgan_utils as fu
from conftest import TEST_DEVICE, with_engine
from fedgan.engine import triton_conv
from helpers import ConvolutionGroups, assert_states_close, train_tiny

pytestmark = pytest.mark.skipif(triton_conv.triton is None, reason="this torch comes without Triton")
DTYPES = [torch.float32] + ([torch.bfloat16] if TEST_DEVICE.startswith("cuda") else [])


@pytest.fixture(autouse=True)
def interpreter_tiles(monkeypatch):
    """On Triton's interpreter, whose cost is per operation of a program, larger tiles: fewer programs and loop
    iterations (other tile shapes than a GPU's, and so the masks at tile edges tested on other shapes)."""
    if fu.TRITON_INTERPRETED:
        monkeypatch.setattr(triton_conv, "TRITON_TILES", {"forward": (256, 64, 128, 4, 1), "input_grad": (256, 64, 128, 4, 1),
                                                 "weight_grad": (64, 128, 256, 4, 1)})


def relative_error(actual, expected):
    return ((actual.float() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed,clients,batch,cin,cout,size,stride", [
    (False, 3, 2, 16, 32, 8, 2),  # D's wide layer: 16 -> 32 channels, 8 -> 4
    (True, 3, 2, 32, 16, 4, 2),  # G's: 4 -> 8
    (False, 2, 3, 2, 16, 10, 2),  # thin: D's first layer
    (True, 2, 3, 16, 1, 5, 2),  # thin: G's last
    (False, 2, 2, 5, 7, 7, 1),  # stride 1, odd sizes and channel counts
    (False, 1, 8, 4, 16, 16, 2),  # one client and a long weight-gradient reduction: split in parts
])
def test_triton_kernels_compute_each_clients_convolution_and_both_gradients(transposed, clients, batch, cin, cout,
                                                                             size, stride, dtype):
    device = torch.device(TEST_DEVICE)
    torch.manual_seed(0)
    x = torch.randn(clients, batch, cin, size, size, device=device, requires_grad=True)  # (K, B, Cin, H, W)
    weight = torch.randn(clients, *((cin, cout) if transposed else (cout, cin)), 4, 4, device=device,
                         requires_grad=True)
    assert fu.triton_can_convolve(transposed, x.shape[1:], weight.shape[1:], stride, 1, device)
    op = F.conv_transpose2d if transposed else F.conv2d
    expected = torch.stack([op(x[k], weight[k], stride=stride, padding=1) for k in range(clients)])
    actual = fu.TritonClientConvolution.apply(x.to(dtype), weight.to(dtype), transposed, stride, 1)
    assert actual.dtype == dtype and actual.shape == expected.shape
    grad_out = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, (x, weight), grad_out)
    actual_grads = torch.autograd.grad(actual, (x, weight), grad_out.to(dtype))
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2  # bfloat16 operands: a relative 2^-8 each
    assert relative_error(actual, expected) < tolerance
    for got, want in zip(actual_grads, expected_grads):
        assert relative_error(got, want) < tolerance


@pytest.mark.parametrize("transposed,size,stride,padding,takes", [
    (False, 28, 2, 1, True), (True, 7, 2, 1, True),  # the cDCGAN's layers
    (False, 9, 2, 1, False),  # an odd image: its input gradient's phases would be uneven
    (False, 8, (2, 1), 1, False), (False, 8, 2, (1, 0), False)])  # non-square stride or padding
def test_triton_kernels_take_only_the_convolutions_they_were_written_for(transposed, size, stride, padding, takes):
    weight = (16, 8, 4, 4)
    assert fu.triton_can_convolve(transposed, (2, 16, size, size), weight, stride, padding,
                                  torch.device(TEST_DEVICE)) is takes


def test_triton_form_trains_the_clients_as_vmaps_grouped_convolutions_and_repeats_exactly(mnist_small, tiny_config):
    """conv_form="triton": D's first and G's last layer in the kernels (no grouped convolution of theirs left),
    the wider layers still vmap's."""
    device = torch.device(TEST_DEVICE)
    images, labels = (t.to(device) for t in mnist_small)
    # the interpreter takes a tenth of a second a kernel; on a GPU, enough steps for a CUDA graph of them
    clients, steps = (2, 1) if fu.TRITON_INTERPRETED else (5, fu.CudaGraphStep.WARMUP + 5)
    config = with_engine(tiny_config(num_clients=clients, local_steps=steps, batch_size=4), client_map="vmap")
    grouped = train_tiny(with_engine(config, conv_form="grouped"), images, labels)
    config = with_engine(config, conv_form="triton")
    with ConvolutionGroups() as seen:
        result = train_tiny(config, images, labels)
    # (transposed, input channels) of the convolutions run as vmap's grouped convolutions
    assert {(False, 2 * clients), (True, 8 * clients)}.isdisjoint(seen.groups)  # D1 2->8, G3 8->1
    assert seen.groups[False, 8 * clients] == seen.groups[True, 16 * clients] == {clients}  # D2 8->16, G2 16->8
    torch.testing.assert_close(result.d_loss, grouped.d_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.g_loss, grouped.g_loss, atol=1e-5, rtol=1e-5)
    assert_states_close(result.g_state, grouped.g_state)
    assert_states_close(result.d_state, grouped.d_state)
    again = train_tiny(config, images, labels)  # same seed, same result, bit for bit
    for key, value in {**result.g_state, **result.d_state}.items():
        assert torch.equal({**again.g_state, **again.d_state}[key], value), key


