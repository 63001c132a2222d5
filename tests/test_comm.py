"""Communication calculator: the paper's figures from public configs (no weights, no network)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fedsb_dp.comm import communication_table
from fedsb_dp.errors import ConfigError

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
GEMMA = os.path.join(FIXTURES, "gemma-2-9b.config.json")
BERT = os.path.join(FIXTURES, "bert-base-uncased.config.json")
GEMMA_270M = os.path.join(FIXTURES, "gemma-3-270m.config.json")


def _row(frame, method):
    return frame.loc[frame["method"] == method].iloc[0]


def test_gemma_2_9b_230x():
    frame = communication_table(GEMMA, rank=32, clients=25, fedsb_rank=200)
    fedsb, fedex, flora = (_row(frame, m) for m in ("fedsb", "fedex-lora", "flora"))
    assert fedsb["adapted_modules"] == 294
    assert fedsb["paper_params"] == 11_760_000            # 200² × 294
    assert flora["paper_params"] == 2_700_902_400         # 25 × 32 × Σ(m+n)
    assert fedex["paper_params"] == flora["paper_params"]
    assert round(fedex["vs_fedsb"]) == 230


def test_gemma_3_270m_bytes_per_round():
    """The offline decoder's real config (converted from the packaged GGUF): 18 layers × 7
    projections; per layer Σ(m+n) = 13,184 and Σm = 6,912 (q 1024×640, k/v 256×640, o 640×1024,
    gate/up 2048×640, down 640×2048)."""
    frame = communication_table(GEMMA_270M, rank=16, clients=3)
    fedsb, fedit, ffa, fedex, flora = (_row(frame, m) for m in
                                       ("fedsb", "fedit", "ffa-lora", "fedex-lora", "flora"))
    assert fedsb["adapted_modules"] == 126
    assert fedsb["uplink_params"] == fedsb["downlink_params"] == 126 * 16 * 16  # 32,256
    assert fedsb["round_bytes_fp32"] == 774_144                 # 4 B × 3 clients × (up + down)
    assert fedit["uplink_params"] == fedit["downlink_params"] == 16 * 18 * 13_184  # 3,796,992
    assert fedit["round_bytes_fp32"] == 91_127_808
    assert ffa["uplink_params"] == 16 * 18 * 6_912                               # 1,990,656
    assert ffa["round_bytes_fp32"] == 47_775_744
    assert flora["downlink_params"] == 3 * 3_796_992
    assert flora["round_bytes_fp32"] == 182_255_616
    assert fedex["round_bytes_fp32"] == 273_383_424
    assert round(fedit["vs_fedsb"], 1) == 117.7


def test_bert_base_query_value_three_clients():
    frame = communication_table(BERT, rank=32, clients=3, fedsb_rank=64, num_labels=3)
    head_only = _row(frame, "head-only")  # the 768×3 + 3 classifier alone, both ways
    assert head_only["uplink_params"] == head_only["downlink_params"] == 2_307
    assert head_only["rank"] == 0
    assert "head-only" not in set(communication_table(GEMMA_270M, rank=16, clients=3)["method"])
    assert _row(frame, "fedsb")["paper_params"] == 100_611        # 24 × 64² + 2,307 head
    assert _row(frame, "fedit")["paper_params"] == 1_181_955      # 1.18 M
    assert round(_row(frame, "ffa-lora")["paper_params"] / 1e4) == 59   # 0.59 M
    assert round(_row(frame, "fedex-lora")["paper_params"] / 1e4) == 355  # 3.55 M
    assert round(_row(frame, "flora")["paper_params"] / 1e4) == 355
    # Measured encodings: FFA sends B only (r·m), FedEx's residual on top of A and B.
    assert _row(frame, "ffa-lora")["uplink_params"] == 24 * 32 * 768 + 2307
    assert _row(frame, "fedex-lora")["downlink_params"] > _row(frame, "fedit")["downlink_params"]


def test_fedsb_traffic_does_not_grow_with_clients():
    small = communication_table(BERT, rank=16, clients=3, num_labels=2)
    large = communication_table(BERT, rank=16, clients=30, num_labels=2)
    assert _row(small, "fedsb")["downlink_params"] == _row(large, "fedsb")["downlink_params"]
    assert _row(large, "flora")["downlink_params"] > 9 * _row(small, "flora")["downlink_params"]


def test_bad_rank_is_named():
    with pytest.raises(ConfigError, match="rank=1000 does not fit"):
        communication_table(BERT, rank=1000, clients=3)


def test_cli(tmp_path):
    out = tmp_path / "comm.csv"
    done = subprocess.run([sys.executable, "-m", "fedsb_dp.cli", "comm", "--model", GEMMA,
                           "--rank", "32", "--fedsb-rank", "200", "--clients", "25",
                           "--out", str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert "229.7×" in done.stdout and out.exists()


def test_a_mean_pooled_checkpoint_counts_the_head_training_sends():
    """MPNet's dense first-token head is replaced by one Linear when mean-pooled (as training
    does for sentence-transformers checkpoints); the calculator must count that head."""
    from fedsb_dp.offline_models import ALL_MPNET_BASE_V2, any_piece_installed

    if not any_piece_installed(ALL_MPNET_BASE_V2):
        pytest.skip("all-mpnet-base-v2 parts not installed (FEDSB_DP_MPNET=1 scripts/install.sh)")
    frame = communication_table("mpnet", rank=4, clients=3, num_labels=2)
    assert _row(frame, "fedsb")["paper_params"] == 24 * 4 * 4 + 768 * 2 + 2


def test_fedsvd_and_rolora_rows():
    """Gemma-3-270M at r = 16 (per layer Σ(m+n) = 13,184, Σm = 6,912, as above): FedSVD sends
    B up and B̄ with the new A down; RoLoRA one factor each way, half of FedIT on average."""
    frame = communication_table(GEMMA_270M, rank=16, clients=3)
    fedsvd, rolora = _row(frame, "fedsvd"), _row(frame, "rolora")
    assert fedsvd["uplink_params"] == 16 * 18 * 6_912                            # 1,990,656
    assert fedsvd["downlink_params"] == 16 * 18 * 13_184                         # 3,796,992
    assert fedsvd["round_bytes_fp32"] == 4 * 3 * (1_990_656 + 3_796_992)         # 69,451,776
    assert rolora["uplink_params"] == rolora["downlink_params"] == 3_796_992 // 2
    assert rolora["round_bytes_fp32"] == 4 * 3 * 3_796_992                       # 45,563,904
