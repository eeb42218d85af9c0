"""What clients send (fedgan/compression.py): top-k, int8, error feedback."""
import torch

import fedgan_utils as fu


def test_topk_sends_the_largest_coordinates_of_the_whole_update():
    update = {"a": torch.tensor([[0.1, -5.0, 0.2]]), "b": torch.tensor([[3.0, -0.3]]), "n": torch.tensor([[7]])}
    sent, nbytes = fu.compress_updates(update, "topk", fraction=0.4)  # 2 of 5 coordinates
    assert torch.equal(sent["a"], torch.tensor([[0.0, -5.0, 0.0]]))
    assert torch.equal(sent["b"], torch.tensor([[3.0, 0.0]]))
    assert torch.equal(sent["n"], update["n"]) and nbytes == 2 * 8 + 8  # two (value, index) pairs + the counter


def test_int8_quantisation_error_is_at_most_half_a_level():
    update = {"w": torch.randn(3, 50, generator=torch.Generator().manual_seed(0))}
    sent, nbytes = fu.compress_updates(update, "int8")
    level = update["w"].abs().amax(1, keepdim=True) / 127  # (3, 1)
    assert ((sent["w"] - update["w"]).abs() <= level / 2 + 1e-7).all()
    assert nbytes == 50 + 4


def test_error_feedback_reconstructs_the_sum_of_updates_over_rounds():
    rng = torch.Generator().manual_seed(1)
    residual = torch.zeros(1, 40)
    total_sent, total_update = torch.zeros(1, 40), torch.zeros(1, 40)
    for _ in range(25):
        update = torch.randn(1, 40, generator=rng)
        intended = update + residual
        sent = fu.compress_updates({"w": intended}, "topk", fraction=0.1)[0]["w"]
        residual = intended - sent
        total_sent += sent
        total_update += update
    torch.testing.assert_close(total_sent + residual, total_update, atol=1e-5, rtol=1e-5)
    assert residual.norm() < 0.5 * total_update.norm()  # what is still owed stays bounded
