"""The partition planner: contiguous, complete, balanced, and clear about impossible splits."""

from __future__ import annotations

import pytest

from coordinator.planner import PlanError, groups_in_flight, plan_partition


@pytest.mark.parametrize("layers", [1, 2, 5, 7, 30, 32, 81])
@pytest.mark.parametrize("stages", [1, 2, 3, 4, 7])
def test_covers_every_layer_once_in_order(layers, stages):
    if stages > layers:
        pytest.skip("impossible split")
    ranges = plan_partition(layers, stages)
    assert len(ranges) == stages
    assert ranges[0][0] == 0 and ranges[-1][1] == layers
    for (_, b), (c, _) in zip(ranges, ranges[1:]):
        assert b == c
    sizes = [b - a for a, b in ranges]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


def test_examples():
    assert plan_partition(30, 3) == [(0, 10), (10, 20), (20, 30)]
    assert plan_partition(30, 4) == [(0, 8), (8, 16), (16, 23), (23, 30)]


def test_weights_shift_layers_to_stronger_stages():
    ranges = plan_partition(12, 3, weights=[2, 1, 1])
    assert [b - a for a, b in ranges] == [6, 3, 3]
    lopsided = plan_partition(5, 3, weights=[100, 1, 1])
    assert [b - a for a, b in lopsided] == [3, 1, 1], "every stage keeps at least one layer"


@pytest.mark.parametrize("args, words", [
    ((0, 1), "at least one layer"), ((4, 0), "at least one stage"), ((3, 4), "each stage needs a layer"),
    ((4, 2, [1]), "weights given"), ((4, 2, [1, 0]), "positive"), ((4, 2, [1, float("nan")]), "positive"),
])
def test_impossible_splits(args, words):
    with pytest.raises(PlanError, match=words):
        plan_partition(*args)


def test_head_cost_shifts_layers_off_the_last_stage():
    assert plan_partition(30, 2, head_cost=8) == [(0, 19), (19, 30)]
    assert plan_partition(30, 1, head_cost=8) == [(0, 30)]
    ranges = plan_partition(4, 2, head_cost=100)  # a huge head still leaves the last stage one layer
    assert ranges == [(0, 3), (3, 4)]
    with pytest.raises(PlanError, match="head_cost"):
        plan_partition(30, 2, head_cost=-1)


def test_head_cost_estimate_from_config():
    from transformers import LlamaConfig

    from coordinator.split_costs import head_cost_in_layers, layer_parameters

    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                         vocab_size=49152, num_hidden_layers=30)
    assert layer_parameters(config) == 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536
    assert head_cost_in_layers(config) == pytest.approx(8.0, rel=0.01)  # SmolLM2-135M's shape


def test_head_cost_for_a_workload_shrinks_with_the_prompt():
    from transformers import LlamaConfig

    from coordinator.split_costs import head_cost_in_layers

    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                         vocab_size=49152, num_hidden_layers=30)
    decode_alone = head_cost_in_layers(config)
    assert head_cost_in_layers(config, (1, 32)) == pytest.approx(decode_alone)  # one prompt token: as decode
    batch = head_cost_in_layers(config, (40, 32))  # the head runs for 32 of the 71 positions the layers see
    assert batch == pytest.approx(decode_alone * 32 / 71)
    assert plan_partition(30, 2, head_cost=batch) == [(0, 17), (17, 30)]
    with pytest.raises(ValueError, match="new_tokens >= 1"):
        head_cost_in_layers(config, (40, 0))


@pytest.mark.parametrize("text, ok", [("40:32", True), ("0:1", True), ("40", False), ("a:b", False),
                                      ("40:0", False), ("-1:5", False)])
def test_balance_for_option(text, ok, capsys):
    from coordinator.cli import build_parser

    argv = ["launch-local", "--model", "m", "--num-stages", "2", "--balance-for", text]
    if ok:
        assert build_parser().parse_args(argv).balance_for == tuple(int(v) for v in text.split(":"))
    else:
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv)
        assert "PROMPT" in capsys.readouterr().err


def test_balance_for_and_no_balance_head_exclude_each_other(capsys):
    from coordinator.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["launch-local", "--model", "m", "--num-stages", "2", "--no-balance-head",
                                   "--balance-for", "40:32"])
    assert "not allowed with" in capsys.readouterr().err


@pytest.mark.parametrize("stages, want", [
    ([(2, 3)] * 4, 1),  # 4 stages sharing one 2-core machine: one group, every core in turn
    ([(2, 1)] * 2, 1),  # 2 stages on 2 cores
    ([(16, 1)] * 2, 1),  # 2 stages on 16 cores
    ([(8, 0)] * 3, 3),  # one stage per machine: the machines overlap
    ([(2, 1), (2, 1), (16, 0)], 2),  # two sharing a machine, one on its own
    ([(0, 0)] * 3, 3),  # cores not said (a GPU stage, or --threads): one each
])
def test_groups_in_flight_one_per_machine(stages, want):
    assert groups_in_flight(stages) == want
