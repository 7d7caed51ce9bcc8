"""Each script's `# ---- method: ... copy this block ----` runs alone: its text is exec'd with only torch and
math in scope (plus the imports it makes itself), and every function it defines is called once on small inputs,
against a formula written out here or the script's own result on the same inputs."""
import math
import os
import re

import pytest
import torch

import em_ft
import em_inf
import em_rl
import select_prompt
import training
from conftest import ROOT


def block(script):
    """The names the marked block of `script` defines, exec'd in a namespace holding torch and math only."""
    with open(os.path.join(ROOT, script)) as f:
        found = re.findall(r"^# ---- method: .*?copy this block ----\n(.*?)^# ---- end method ----", f.read(),
                           flags=re.S | re.M)
    assert len(found) == 1, f"{script}: one marked block"
    scope = {"torch": torch, "math": math}
    exec(compile(found[0], f"{script} (method block)", "exec"), scope)
    return {k: v for k, v in scope.items() if callable(v) and getattr(v, "__module__", None) is None}


def batch(tiny):
    """Two left-padded (prompt, response) rows of the tiny model, the response marked (EOS included)."""
    model, tok = tiny
    rows = [([5, 9, 14], [20, 21, tok.eos_token_id]), ([7, 8, 9, 10, 11], [30, tok.eos_token_id])]
    return model, training.pack(rows, tok.pad_token_id, "cpu")


def test_em_ft_block(tiny):
    fns = block("em_ft.py")
    assert set(fns) == {"token_entropy", "response_entropy", "em_loss"}
    head = torch.nn.Linear(8, 5, bias=False)
    h = torch.randn(3, 8)
    p = torch.softmax(head(h) / 0.5, -1)
    assert torch.allclose(fns["token_entropy"](h, head, 0.5), -(p * p.log()).sum(-1), atol=1e-6)
    model, (ids, attn, resp) = batch(tiny)
    with torch.no_grad():
        ent, n = fns["response_entropy"](model, ids, attn, resp, 0.5, 2)
        want = em_ft.response_entropy(model, ids, attn, resp, 0.5, 1024)
    assert n.tolist() == [3, 2] and torch.allclose(ent, want[0]) and torch.equal(n, want[1])
    for norm, value in (("token-mean", 6 / 10), ("trajectory-sum", 6 / 4), ("micro-token-mean", 6 / 3 / 2)):
        assert fns["em_loss"](torch.tensor(6.0), torch.tensor(3.0), norm, 10, 4, 2).item() == pytest.approx(value)


def test_em_rl_block(tiny):
    fns = block("em_rl.py")
    assert set(fns) == {"logit_stats", "response_stats", "em_rewards", "group_advantages"}
    logits, targets = torch.randn(4, 6), torch.tensor([0, 5, 2, 2])
    logp, ent, cert = fns["logit_stats"](logits, targets)
    full = torch.log_softmax(logits, -1)
    assert torch.allclose(logp, full[torch.arange(4), targets])
    assert torch.allclose(ent, -(full.exp() * full).sum(-1))
    assert torch.allclose(cert, (-math.log(6) - full.mean(-1)))  # KL(U || pi)
    model, (ids, attn, resp) = batch(tiny)
    with torch.no_grad():
        got, want = fns["response_stats"](model, ids, attn, resp, 2), em_rl.response_stats(model, ids, attn, resp)
    assert got[3].tolist() == [0, 0, 0, 1, 1] and all(torch.allclose(a.float(), b.float()) for a, b in zip(got, want))
    row = torch.tensor([0, 0, 1])
    r = fns["em_rewards"](torch.tensor([-1.0, -2.0, -4.0]), torch.tensor([1.0, 3.0, 2.0]), torch.zeros(3), row, 2,
                          "token", "mean")
    assert r.tolist() == [-2.0, -2.0]  # minus the mean entropy of each response
    adv = fns["group_advantages"](torch.tensor([1.0, 2.0, 3.0, 5.0]), 2, "rloo")
    assert adv.tolist() == [-1.0, 1.0, -2.0, 2.0]


def test_em_inf_block():
    fns = block("em_inf.py")
    assert set(fns) == {"minimize_logit_entropy"}
    logits = torch.randn(3, 11, dtype=torch.float64)
    got = fns["minimize_logit_entropy"](logits, n_steps=3, lr=0.1, threshold=0.0, kl_weight=0.05)
    assert torch.equal(got, em_inf.minimize_logit_entropy(logits, n_steps=3, lr=0.1, threshold=0.0, kl_weight=0.05))
    h = lambda z: torch.special.entr(torch.softmax(z, -1)).sum(-1)  # noqa: E731
    assert (h(got) < h(logits)).all()  # the update lowers every row's entropy


def test_select_prompt_block():
    fns = block("select_prompt.py")
    assert set(fns) == {"variance_score", "disagreement_score", "entropy_score", "rank_key", "tie_at_top"}
    assert fns["variance_score"](3, 4) == 3 / 16 == fns["variance_score"](1, 4)
    assert fns["disagreement_score"](["1", "1", None, "2"]) == 0.5
    assert fns["entropy_score"]([2.0, 4.0], [1, 3]) == 1.5
    rows = [{"score": 0.25, "p": 0.5, "index": 1}, {"score": 0.25, "p": 0.5, "index": 0},
            {"score": 0.1, "p": None, "index": 2}]
    assert sorted(rows, key=fns["rank_key"]) == sorted(rows, key=select_prompt.rank_key)
    assert [r["index"] for r in sorted(rows, key=fns["rank_key"])] == [0, 1, 2]
    assert fns["tie_at_top"](sorted(rows, key=fns["rank_key"])) == 2
