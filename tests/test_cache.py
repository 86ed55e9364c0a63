"""Unit tier: the First Block Cache state machine on a toy block stack (CPU, no ComfyUI)."""
import pickle

import pytest
import torch

from comfy_para_attn.cache import FirstBlockCache, FirstBlockCacheSettings, relative_diff_sums


class ToyStack(torch.nn.Module):
    """Residual MLP blocks; `forward(x, cache, step)` uses the cache like an adapter does."""

    def __init__(self, depth=4, width=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(depth))

    def block(self, i, x):
        return x + torch.tanh(self.blocks[i](x))

    def forward(self, x, cache=None, step=None, part="all", **kw):
        h0 = self.block(0, x)
        if cache is not None and cache.begin_call(part, step, h0 - x, **kw):
            return h0 + cache.tail(part)
        h = h0
        for i in range(1, len(self.blocks)):
            h = self.block(i, h)
        if cache is not None:
            cache.end_call(part, h - h0)
        return h


def ones(scale=1.0, n=64):
    return torch.full((2, n), scale)


def test_threshold_zero_is_bit_identical_on_toy_stack():
    model = ToyStack()
    cache = FirstBlockCache(0.0)
    x = torch.randn(3, 16)
    for step in (1.0, 0.9, 0.8, 0.7):
        x_next_ref = model(x)
        x_next = model(x, cache, step)
        assert torch.equal(x_next, x_next_ref)
        x = x - 0.01 * x_next  # nearly unchanged input: would hit with any threshold > 0
    assert cache.hits == 0 and cache.calls == 4


def test_hit_reuses_tail_and_matches_plain_model_for_nearly_equal_inputs():
    model = ToyStack()
    cache = FirstBlockCache(0.05)
    x = torch.randn(3, 16)
    model(x, cache, 1.0)
    y = x + 1e-4 * torch.randn(3, 16)
    out = model(y, cache, 0.9)
    assert cache.history == [False, True]
    ref = model(y)
    assert torch.isfinite(out).all() and ref.abs().mean() > 0.1
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)


def test_relative_diff_matches_plain_formula():
    a, b = torch.randn(5, 7), torch.randn(5, 7)
    num, den = relative_diff_sums(a, b).tolist()
    assert num / den == pytest.approx(((a - b).abs().mean() / b.abs().mean()).item(), rel=1e-5)


def test_previous_residual_is_the_last_computed_one():
    cache = FirstBlockCache(0.1)
    assert not cache.begin_call("p", 1.0, ones(1.0))
    cache.end_call("p", {"img": ones()})
    assert cache.begin_call("p", 0.9, ones(1.05))  # 0.05 against r(1.0): hit
    # 0.15 against the last computed residual (1.0): miss. Against the hit's 1.05 it would be 0.095.
    assert not cache.begin_call("p", 0.8, ones(1.15))
    assert cache.last_diff == pytest.approx(0.15, rel=1e-5)
    cache.end_call("p", {"img": ones()})
    assert cache.begin_call("p", 0.7, ones(1.2))  # now compared with 1.15
    assert cache.history == [False, True, False, True]


def run_steps(cache, scales, part="p", step0=1.0):
    out = []
    for i, s in enumerate(scales):
        hit = cache.begin_call(part, step0 - 0.01 * i, ones(s))
        if not hit:
            cache.end_call(part, "tail")
        out.append(hit)
    return out


def test_max_consecutive_hits():
    assert run_steps(FirstBlockCache(0.5, 2), [1.0] * 7) == [False, True, True, False, True, True, False]
    assert run_steps(FirstBlockCache(0.5, 0), [1.0] * 4) == [False] * 4
    assert run_steps(FirstBlockCache(0.5, -1), [1.0] * 4) == [False, True, True, True]


def test_a_second_evaluation_at_one_sigma_decides_on_its_own():
    """Heun-type samplers call the model at sigma i+1 for step i's correction and again for
    step i+1 (another input): two steps, each compared and counted towards the cap, not one
    decision shared (which let two hits in a row past max_consecutive_hits 1)."""
    cache = FirstBlockCache(0.5, 1)
    hits = []
    for sigma in (1.0, 0.9, 0.9, 0.8, 0.8, 0.7, 0.7):
        hits.append(cache.begin_call("p", sigma, ones()))
        if not hits[-1]:
            cache.end_call("p", "tail")
    assert hits == [False, True, False, True, False, True, False]
    # cond and uncond in separate calls: the pair at one sigma is one step, a repeat is the next
    cache = FirstBlockCache(0.5)
    decided = []
    for sigma in (1.0, 0.9, 0.9):
        for part in ("cond", "uncond"):
            decided.append(cache.begin_call(part, sigma, ones()))
            if not decided[-1]:
                cache.end_call(part, "tail")
    assert decided == [False, False, True, True, True, True] and cache.calls == 6


def test_not_allowed_steps_compute():
    cache = FirstBlockCache(0.5)
    hits = []
    for i in range(6):
        hits.append(cache.begin_call("p", 1.0 - 0.1 * i, ones(), allowed=i not in (2, 3)))
        if not hits[-1]:
            cache.end_call("p", "tail")
    assert hits == [False, True, False, False, True, True]


def test_rising_step_resets():
    cache = FirstBlockCache(0.5)
    assert run_steps(cache, [1.0, 1.0], step0=0.5) == [False, True]
    assert not cache.begin_call("p", 0.9, ones())  # sigma rose: new schedule, clean cache
    assert cache.begin_call("p", 0.8, ones()) is False  # no tail stored after the reset miss


@pytest.mark.parametrize("change", ["shape", "dtype"])
def test_signature_change_resets_part(change):
    cache = FirstBlockCache(0.5)
    assert run_steps(cache, [1.0, 1.0]) == [False, True]
    r = torch.full((2, 65), 1.0) if change == "shape" else ones().double()
    assert not cache.begin_call("p", 0.5, r)


def test_parts_share_one_decision_and_keep_their_buffers():
    cache = FirstBlockCache(0.1)
    for part, r in (("cond", ones(1.0)), ("uncond", ones(5.0))):
        assert not cache.begin_call(part, 1.0, r)
        cache.end_call(part, part)
    # cond decides (diff 0.02 -> hit); uncond follows although its own diff is large
    assert cache.begin_call("cond", 0.9, ones(1.02))
    assert cache.begin_call("uncond", 0.9, ones(50.0))
    assert cache.tail("cond") == "cond" and cache.tail("uncond") == "uncond"
    # a part seen for the first time computes even on a hit step
    assert not cache.begin_call("other", 0.9, ones())
    # cond decides a miss (diff 1.0); uncond computes although its diff is 0
    assert not cache.begin_call("cond", 0.8, ones(2.0))
    assert not cache.begin_call("uncond", 0.8, ones(5.0))
    assert cache.hits == 2 and cache.calls == 7


def test_free_drops_all_buffers_and_keeps_counts():
    cache = FirstBlockCache(0.5)
    run_steps(cache, [1.0, 1.0, 1.0])
    assert cache.buffers == 2
    cache.free()
    assert cache.buffers == 0 and cache.hits == 2 and cache.calls == 3
    assert cache.summary() == "reused 2 of 3 model calls (threshold 0.5)"
    assert not cache.begin_call("p", 1.0, ones())


def test_reduce_sum_runs_on_every_deciding_call_and_sees_vetoes():
    seen = []

    def reduce_sum(t):
        seen.append(t.clone())
        return t + torch.tensor([0.0, 0.0, 1.0]) * (len(seen) == 3)  # a peer vetoes the 3rd step

    cache = FirstBlockCache(0.5)
    hits = []
    for i in range(4):
        hit = cache.begin_call("p", 1.0 - 0.1 * i, ones(), reduce_sum=reduce_sum)
        hits.append(hit)
        if not hit:
            cache.end_call("p", "tail")
    assert hits == [False, True, False, True]
    assert len(seen) == 4  # including the first call, which cannot hit locally
    assert seen[0].tolist() == [0.0, 0.0, 1.0] and seen[1][2] == 0


def test_settings_validate_and_pickle():
    s = FirstBlockCacheSettings(0.1, 0.2, 0.8, 3)
    assert pickle.loads(pickle.dumps(s)) == s and s.enabled
    assert not FirstBlockCacheSettings(0.0).enabled and not FirstBlockCacheSettings(0.1, max_consecutive_hits=0).enabled
    for bad in (dict(residual_diff_threshold=-1), dict(start_percent=2), dict(max_consecutive_hits=-2)):
        with pytest.raises(ValueError):
            FirstBlockCacheSettings(**bad)
    # A window that ends before it starts would silently never cache: say what to change.
    with pytest.raises(ValueError, match="lower start_percent or raise end_percent"):
        FirstBlockCacheSettings(0.12, start_percent=0.8, end_percent=0.2)
    assert FirstBlockCacheSettings(0.12, start_percent=0.5, end_percent=0.5).enabled
