"""The forms of K clients' thin convolutions under vmap (fedgan/engine/convolutions.py)."""
import pytest
import torch

import fedgan_utils as fu
from conftest import TEST_DEVICE, with_engine
from fedgan.engine import convolutions
from helpers import ConvolutionGroups, assert_states_close, train_tiny


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("block", [1, 2, 5, 8])  # 2: five clients padded to three groups of two; 8: one group
def test_block_diagonal_convolution_computes_each_clients_own_convolution_and_gradients(transposed, block):
    device = torch.device(TEST_DEVICE)
    torch.manual_seed(0)
    x = torch.randn(5, 3, 2, 9, 9, device=device, requires_grad=True)  # (K, B, Cin, H, W)
    weight = torch.randn(5, *((2, 4) if transposed else (4, 2)), 4, 4, device=device, requires_grad=True)
    op = torch.nn.functional.conv_transpose2d if transposed else torch.nn.functional.conv2d
    expected = torch.stack([op(x[k], weight[k], stride=2, padding=1) for k in range(5)])  # (K, B, Cout, H', W')
    blocked = fu.block_diagonal_convolution(transposed, x, weight, 2, 1, block)  # (B, K, Cout, H', W')
    torch.testing.assert_close(blocked.transpose(0, 1), expected, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(expected)
    torch.testing.assert_close(torch.autograd.grad(blocked.transpose(0, 1), (x, weight), grad_out),
                               torch.autograd.grad(expected, (x, weight), grad_out), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("form,block,clients,thin_groups", [  # clients: in a thin convolution's input
    ("grouped", 2, 5, 5), ("block", 2, 6, 3), ("block", 10, 5, 1), ("auto", 10, 5, 1), ("loop", 2, 1, 1)])
def test_conv_forms_change_only_the_thin_convolutions_and_train_the_clients_alike(mnist_small, tiny_config, form,
                                                                                   block, clients, thin_groups):
    """D's first and G's last layer (2 and 1 channels a client) take the form asked for; the wider ones stay vmap's
    grouped convolutions (groups=K)."""
    images, labels = mnist_small
    config = with_engine(tiny_config(num_clients=5, device="cpu"), client_map="vmap")
    grouped = train_tiny(with_engine(config, conv_form="grouped"), images, labels)
    with ConvolutionGroups() as seen:
        result = train_tiny(with_engine(config, conv_form=form, conv_block_clients=block), images, labels)
    assert seen.groups[False, 2 * clients] == seen.groups[True, 8 * clients] == {thin_groups}  # D1 2->8, G3 8->1
    assert seen.groups[False, 8 * 5] == seen.groups[True, 16 * 5] == {5}  # D2 8->16, G2 16->8
    torch.testing.assert_close(result.d_loss, grouped.d_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.g_loss, grouped.g_loss, atol=1e-5, rtol=1e-5)
    assert_states_close(result.g_state, grouped.g_state)
    assert_states_close(result.d_state, grouped.d_state)


@pytest.mark.parametrize("clients,overrides,thin_groups", [
    (5, {}, 1), (10, {}, 1),  # float32, deterministic cuDNN, up to 10 clients: one block-diagonal convolution
    (12, {}, 12), (5, {"bfloat16": True}, 5), (5, {"deterministic": False}, 5), (1, {}, 1)])  # else groups=K
def test_auto_conv_form_blocks_the_thin_convolutions_only_where_it_was_measured_faster(mnist_small, tiny_config,
                                                                                       clients, overrides, thin_groups):
    images, labels = mnist_small
    with ConvolutionGroups() as seen:
        train_tiny(with_engine(tiny_config(num_clients=clients, device="cpu"), client_map="vmap", **overrides), images,
                   labels)
    assert seen.groups[False, 2 * clients] == {thin_groups}  # D's first layer


@pytest.mark.parametrize("clients,device,with_triton,overrides,form", [
    (5, "cuda", True, {}, "triton"), (100, "cuda", True, {}, "triton"),  # measured faster at 10 and 100 clients
    (100, "cuda", True, {"bfloat16": True}, "triton"),
    (5, "cuda", True, {"deterministic": False}, None),  # autotuned cuDNN: vmap's grouped convolutions were faster
    (1, "cuda", True, {}, None),  # one client: vmap's convolution is a plain one
    (5, "cuda", False, {}, "block"), (5, "cpu", True, {}, "block")])  # no Triton, or no GPU: as without Triton
def test_auto_conv_form_takes_the_triton_kernels_on_a_gpu_with_triton(monkeypatch, clients, device, with_triton,
                                                                      overrides, form):
    if not with_triton:
        monkeypatch.setattr(convolutions, "triton", None)
    mode = convolutions.client_convolutions(fu.EngineOptions(**overrides), True, clients, torch.device(device))
    assert getattr(mode, "form", None) == form  # None: no mode, vmap's own convolutions


def test_triton_form_on_a_gpu_without_triton_says_what_is_missing(monkeypatch):
    monkeypatch.setattr(convolutions, "triton", None)
    with pytest.raises(RuntimeError, match="needs the triton package"):
        convolutions.client_convolutions(fu.EngineOptions(conv_form="triton"), True, 5, torch.device("cuda"))
