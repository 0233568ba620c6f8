"""Per-sequence sampling constants on the device: written once, gathered per step by slot."""
import torch

from psnrl.engine.sampling import SamplingParams
from psnrl.engine.sampling_slots import SamplingSlots

CPU = torch.device("cpu")


def test_rows_gather_each_sequences_constants_by_slot_and_grow_past_capacity():
    slots = SamplingSlots(CPU, vocab=100, capacity=2)
    params = [SamplingParams(temperature=0.5 + i, top_p=1.0 - 0.1 * (i % 2), top_k=-1 if i % 3 else 7)
              for i in range(5)]
    taken = [slots.acquire(2**62 + i, p) for i, p in enumerate(params)]  # grows 2 -> 4 -> 8
    assert len(set(taken)) == 5 and slots.capacity == 8
    order = [3, 0, 4]
    r = slots.rows([taken[i] for i in order], [5, 0, 9])
    assert r.seeds.tolist() == [2**62 + i for i in order]
    assert r.temperatures.tolist() == [params[i].temperature for i in order]
    assert torch.allclose(r.top_p, torch.tensor([params[i].top_p for i in order]))
    assert r.top_k.tolist() == [params[i].top_k for i in order]
    assert r.steps.tolist() == [5, 0, 9] and r.truncates  # sequence 3 has top-p 0.9
    assert all(t.is_contiguous() for t in (r.seeds, r.temperatures, r.top_p, r.top_k, r.steps))  # kernel inputs


def test_truncation_is_known_on_the_host():
    slots = SamplingSlots(CPU, vocab=100)
    plain = slots.acquire(1, SamplingParams())
    wide_k = slots.acquire(2, SamplingParams(top_k=100))  # keeps the whole vocabulary
    k = slots.acquire(3, SamplingParams(top_k=99))
    assert not slots.rows([plain, wide_k], [0, 0]).truncates
    assert slots.rows([plain, k], [0, 0]).truncates


def test_released_slots_are_reused_with_their_new_constants():
    slots = SamplingSlots(CPU, vocab=10, capacity=2)
    a = slots.acquire(11, SamplingParams(temperature=0.3))
    slots.rows([a], [0])
    slots.release(a)
    b = slots.acquire(22, SamplingParams(temperature=0.7))
    assert b == a and slots.capacity == 2
    r = slots.rows([b], [1])
    assert r.seeds.tolist() == [22] and abs(r.temperatures.item() - 0.7) < 1e-7
    slots.acquire(33, SamplingParams())
    slots.reset()
    assert sorted(slots.acquire(i, SamplingParams()) for i in range(2)) == [0, 1] and slots.capacity == 2


def test_stop_tokens_and_min_tokens_are_gathered_only_while_some_row_bars_them():
    slots = SamplingSlots(CPU, vocab=100, capacity=4, stop_width=2)
    plain = slots.acquire(1, SamplingParams(), stop_ids=(2,))  # no min_tokens: its stops are not kept
    barred = slots.acquire(2, SamplingParams(min_tokens=3, stop_token_ids=[7]), stop_ids=(7, 2))
    assert slots.generation == 1  # built once, no reallocation yet
    assert slots.masks_stops([plain, barred], [0, 2]) and not slots.masks_stops([plain, barred], [0, 3])
    assert not slots.masks_stops([plain], [0])
    r = slots.rows([barred, plain], [2, 5])
    assert r.stop_ids is not None and r.stop_ids.tolist() == [[7, 2], [-1, -1]]
    assert r.min_tokens.tolist() == [3, 0] and r.mask_stops.tolist() == [True, False]
    assert slots.rows([barred, plain], [3, 5]).stop_ids is None  # nobody bars them: nothing gathered


def test_tables_that_move_bump_the_generation_and_keep_every_row():
    slots = SamplingSlots(CPU, vocab=100, capacity=1, stop_width=2)
    a = slots.acquire(5, SamplingParams(min_tokens=1), stop_ids=(1, 2))
    slots.flush()
    g = slots.generation
    b = slots.acquire(6, SamplingParams(min_tokens=2), stop_ids=(3, 4, 5))  # wider, and a new slot
    assert slots.generation == g + 2 and slots.capacity == 2 and slots.stops.shape[1] == 4
    r = slots.rows([a, b], [0, 0])
    assert r.seeds.tolist() == [5, 6] and r.stop_ids.tolist() == [[1, 2, -1, -1], [3, 4, 5, -1]]


def test_release_and_reset_forget_truncation_and_min_tokens():
    slots = SamplingSlots(CPU, vocab=100, capacity=2)
    t = slots.acquire(1, SamplingParams(top_p=0.5))
    m = slots.acquire(2, SamplingParams(min_tokens=4), stop_ids=(3,))
    slots.release(t)
    slots.release(m)
    again = slots.acquire(3, SamplingParams())
    assert not slots.truncates([again]) and not slots.masks_stops([again], [0])
    slots.acquire(4, SamplingParams(top_k=5, min_tokens=1), stop_ids=(0,))
    slots.reset()
    fresh = [slots.acquire(i, SamplingParams()) for i in range(2)]
    assert not slots.truncates(fresh) and not slots.masks_stops(fresh, [0, 0])
