"""KD and CE losses against values computed by hand (plain Python math) on tiny tensors."""
import math

import pytest
import torch

from kuaida.errors import InvalidArgumentError
from kuaida.train import losses
from kuaida.train.losses import CrossEntropyLoss, DistillLoss, ForwardKLLoss, ReverseKLLoss, kept_labels

# One batch row, two positions, vocabulary of 3.
STUDENT = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
TEACHER = [[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]]


def softmax(xs, t=1.0):
    e = [math.exp(x / t) for x in xs]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def tensors(labels=(1, 2)):
    return torch.tensor([STUDENT]), torch.tensor([TEACHER]), torch.tensor([list(labels)])


def test_forward_kl_is_t_squared_times_kl_of_softened_distributions():
    s, t, y = tensors()
    # T = 2: KL of the distributions softened by 2, times 4, averaged over the two tokens.
    want = sum(4 * kl(softmax(tt, 2), softmax(ss, 2)) for ss, tt in zip(STUDENT, TEACHER)) / 2
    assert ForwardKLLoss(2.0)(s, t, y).item() == pytest.approx(want, rel=1e-5)
    want_t1 = sum(kl(softmax(tt), softmax(ss)) for ss, tt in zip(STUDENT, TEACHER)) / 2
    assert ForwardKLLoss(1.0)(s, t, y).item() == pytest.approx(want_t1, rel=1e-5)


def test_reverse_kl_swaps_the_distributions():
    s, t, y = tensors()
    want = sum(4 * kl(softmax(ss, 2), softmax(tt, 2)) for ss, tt in zip(STUDENT, TEACHER)) / 2
    got = ReverseKLLoss(2.0)(s, t, y).item()
    assert got == pytest.approx(want, rel=1e-5)
    assert got != pytest.approx(ForwardKLLoss(2.0)(s, t, y).item(), rel=1e-3)


def test_identical_distributions_give_zero_kl():
    s, _, y = tensors()
    assert ForwardKLLoss(2.0)(s, s.clone(), y).item() == pytest.approx(0.0, abs=1e-6)
    assert ReverseKLLoss(2.0)(s, s.clone(), y).item() == pytest.approx(0.0, abs=1e-6)


def test_masked_tokens_do_not_count():
    s, t, _ = tensors()
    y = torch.tensor([[-100, 2]])  # only the second position counts
    want = 4 * kl(softmax(TEACHER[1], 2), softmax(STUDENT[1], 2))
    assert ForwardKLLoss(2.0)(s, t, y).item() == pytest.approx(want, rel=1e-5)
    want_ce = -math.log(softmax(STUDENT[1])[2])
    assert CrossEntropyLoss()(s, None, y).item() == pytest.approx(want_ce, rel=1e-5)
    nothing = torch.full_like(y, -100)
    assert ForwardKLLoss(2.0)(s, t, nothing).item() == 0.0


def test_alpha_mixes_cross_entropy_and_kd():
    s, t, y = tensors()
    ce = sum(-math.log(softmax(ss)[label]) for ss, label in zip(STUDENT, (1, 2))) / 2
    kd = sum(4 * kl(softmax(tt, 2), softmax(ss, 2)) for ss, tt in zip(STUDENT, TEACHER)) / 2
    assert DistillLoss(0.3, 2.0)(s, t, y).item() == pytest.approx(0.3 * ce + 0.7 * kd, rel=1e-5)
    assert DistillLoss(1.0, 2.0)(s, None, y).item() == pytest.approx(ce, rel=1e-5)  # no teacher needed
    assert DistillLoss(0.0, 2.0)(s, t, y).item() == pytest.approx(kd, rel=1e-5)
    with pytest.raises(InvalidArgumentError):
        DistillLoss(1.5)
    with pytest.raises(InvalidArgumentError):
        DistillLoss(0.5, kind="sideways")
    with pytest.raises(InvalidArgumentError):
        ForwardKLLoss(0.0)


def test_chunked_loss_and_gradient_equal_unchunked(monkeypatch):
    torch.manual_seed(0)
    s = torch.randn(2, 7, 11, requires_grad=True)
    with torch.inference_mode():  # as the teacher's logits come in distillation
        t = torch.randn(2, 7, 11)
    y = torch.randint(0, 11, (2, 7))
    y[0, :3] = -100
    results = []
    for chunk in (1 << 24, 11 * 3):  # one chunk; chunks of 3 tokens (a ragged last one)
        monkeypatch.setattr(losses, "CHUNK_ELEMENTS", chunk)
        s.grad = None
        loss = DistillLoss(0.5, 2.0, "reverse")(s, t, y)
        loss.backward()
        results.append((loss.item(), s.grad.clone()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-7)
    assert results[0][1][0, :3].abs().sum() == 0  # masked positions get no gradient


def test_forward_kl_gradient_is_t_times_q_minus_p():
    """d(T^2 KL(p^T || q^T)) / d z_student = T (q^T - p^T): the T^2 factor keeps gradients at CE scale."""
    s, t, y = tensors()
    s.requires_grad_(True)
    ForwardKLLoss(2.0)(s, t, y).backward()
    want = 2.0 * (torch.softmax(s.detach() / 2, -1) - torch.softmax(t / 2, -1)) / 2  # / 2 tokens
    assert torch.allclose(s.grad, want, atol=1e-6)


def test_teacher_zero_probabilities_are_not_nan():
    s, t, y = tensors()
    t[0, 0, 1] = float("-inf")  # a token the teacher cannot emit
    assert math.isfinite(ForwardKLLoss(2.0)(s, t, y).item())


def test_kept_labels_maps_into_the_kept_vocabulary():
    labels = torch.tensor([[-100, 3, 7, 5], [0, 9, -100, 7]])
    mapped, dropped = kept_labels(labels, (0, 3, 7), vocab_size=10)
    assert mapped.tolist() == [[-100, 1, 2, -100], [0, -100, -100, 2]]
    assert dropped == 2  # 5 and 9 were pruned
