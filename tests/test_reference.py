"""The reference itself: the course model and the functional loop agree."""
import torch

from conftest import backend_device
from fused_rnn import CharLoopModel, fused_rnn, rnn_reference


def test_char_loop_model_is_the_recurrence():
    device = backend_device("triton")  # where the fused check below runs
    torch.manual_seed(0)
    model = CharLoopModel(vocab_size=13, n_fac=5, n_hidden=24).to(device)
    cs = [torch.randint(0, 13, (6,), device=device) for _ in range(8)]
    x = torch.stack(cs, dim=1)
    args = dict(w_in=model.l_in.weight, b_in=model.l_in.bias, w_h=model.l_hidden.weight,
                b_h=model.l_hidden.bias, embedding=model.e.weight)
    for h_n in (rnn_reference(x, **args)[1], fused_rnn(x, **args, backend="triton")[1]):
        want = torch.log_softmax(model.l_out(h_n), dim=-1)
        torch.testing.assert_close(model(*cs), want, rtol=1e-5, atol=1e-6)


def test_char_loop_model_state_follows_parameters():
    model = CharLoopModel(7, 3, 8).double()
    out = model(torch.tensor([1, 2]), torch.tensor([3, 4]))
    assert out.dtype == torch.float64 and out.shape == (2, 7)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(2, dtype=torch.float64))
