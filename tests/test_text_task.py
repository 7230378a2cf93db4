"""The text task: next-character prediction on LEAF Shakespeare with a character Transformer.

Each test states one rule, on a tiny synthetic LEAF json written here (gzip, 12-character
windows, 4 users) unless it is marked ``integration`` (the staged real file).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import fedhelpers
import numpy as np
import pytest
import torch
from rich.console import Console

from fedvit.config import ConfigError, FedvitConfig, load_config
from fedvit.data import (
    DataError,
    TextDataset,
    build_partition,
    clear_all_caches,
    format_partition_table,
    load_client_datasets,
    load_source,
    summarize_partition,
)
from fedvit.data.text import ALL_LETTERS, UNKNOWN_INDEX, VOCAB_SIZE, encode
from fedvit.evaluation import flops_per_sample
from fedvit.models import CharTransformer, build_model, example_input
from fedvit.params import ParameterSplit, parameter_groups

SEQ = 12
USERS = {"ROMEO": (30, 6), "JULIET": (24, 5), "NURSE": (18, 4), "FRIAR": (12, 3)}  # (train, test)
TINY = "model.depth=1 model.embed_dim=16 model.num_heads=2 train.batch_size=16 train.local_epochs=1"


@pytest.fixture(autouse=True)
def _fresh_process_caches():
    clear_all_caches()
    yield
    clear_all_caches()


def leaf_json(users: dict[str, tuple[int, int]], seq: int = SEQ, seed: int = 0) -> dict:
    """``{"train": LEAF-json, "test": LEAF-json}`` of random windows over LEAF's vocabulary."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, which in (("train", 0), ("test", 1)):
        data = {}
        for user, sizes in users.items():
            text = "".join(rng.choice(list(ALL_LETTERS), sizes[which] + seq))
            data[user] = {"x": [text[i : i + seq] for i in range(sizes[which])], "y": list(text[seq:])}
        out[split] = {
            "users": list(users),
            "num_samples": [s[which] for s in users.values()],
            "user_data": data,
        }
    return out


def write_json(path: Path, content: object) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        json.dump(content, fh)
    return path


@pytest.fixture
def leaf_file(tmp_path: Path) -> Path:
    return write_json(tmp_path / "shakespeare.json.gz", leaf_json(USERS))


def text_cfg(tmp_path: Path, path: Path | str, num_clients: int = 4, extra: str = "") -> FedvitConfig:
    """The shakespeare dataset + char-transformer model layers, on ``path``."""
    return load_config(
        {
            "dataset": "shakespeare",
            "model": "char-transformer",
            "num-clients": num_clients,
            "overrides": f"data.path={path} data.seq_len={SEQ} data.cache_dir={tmp_path / 'cache'} {extra}",
        }
    )


# --------------------------------------------------------------------------- vocabulary


def test_characters_map_to_leafs_80_letter_vocabulary_and_unknown_ones_to_the_last_index():
    assert VOCAB_SIZE == len(ALL_LETTERS) == 80
    assert encode("\n !").tolist() == [0, 1, 2]
    assert encode("Aa}").tolist() == [ALL_LETTERS.index("A"), ALL_LETTERS.index("a"), 79]
    assert UNKNOWN_INDEX == 79
    assert encode("é#€").tolist() == [79, 79, 79]  # outside the vocabulary, as LEAF's letter_to_vec
    assert encode("").dtype == np.int64 and len(encode("")) == 0


# --------------------------------------------------------------------------- source and clients


def test_source_gives_int64_windows_next_character_labels_and_user_ids(tmp_path, leaf_file):
    content = leaf_json(USERS)
    src = load_source(text_cfg(tmp_path, leaf_file).data)
    assert (len(src.train), len(src.test)) == tuple(map(sum, zip(*USERS.values(), strict=True)))
    first = src.train.images[0]
    assert first.dtype == np.int64 and first.shape == (SEQ,)
    assert "".join(ALL_LETTERS[i] for i in first) == content["train"]["user_data"]["ROMEO"]["x"][0]
    assert src.train.labels[0] == ALL_LETTERS.index(content["train"]["user_data"]["ROMEO"]["y"][0])
    assert list(src.train.ids[:2]) == ["ROMEO", "ROMEO"] and src.test.ids[-1] == "FRIAR"
    assert src.class_names is not None and len(src.class_names) == 80 and src.class_names[1] == "' '"


def test_natural_partition_gives_one_user_per_client_with_its_own_test_data(tmp_path, leaf_file):
    cfg = text_cfg(tmp_path, leaf_file)
    seen = set()
    for cid in range(4):
        ds = load_client_datasets(cfg, cid)
        n_train, n_test = USERS[ds.natural_id]
        seen.add(ds.natural_id)
        assert ds.sizes["train"] + ds.sizes["val"] == n_train and ds.sizes["test"] == n_test
        assert isinstance(ds.train, TextDataset)
        x, y = ds.train[0]
        assert x.dtype == torch.int64 and x.shape == (SEQ,) and isinstance(y, int)
        hist = ds.label_histograms
        assert len(hist["train"]) == 80 and hist["test"].sum() == n_test
    assert seen == set(USERS)


def test_partition_summary_and_table_work_for_text(tmp_path, leaf_file):
    cfg = text_cfg(tmp_path, leaf_file)
    rows = summarize_partition(cfg)
    assert {r["natural_id"] for r in rows} == set(USERS)
    assert all(sum(r["train_hist"]) == r["n_train"] and len(r["test_hist"]) == 80 for r in rows)
    console = Console(record=True, width=160)
    console.print(format_partition_table(rows, load_source(cfg.data).class_names))
    assert "4 clients" in console.export_text()


def test_fewer_clients_than_users_draws_users_with_the_seed(tmp_path, leaf_file):
    part = build_partition(text_cfg(tmp_path, leaf_file, num_clients=2))
    assert part.num_clients == 2 and set(part.natural_ids) <= set(USERS)


def test_more_clients_than_users_names_the_key(tmp_path, leaf_file):
    with pytest.raises(DataError, match=r"'clients\.num_clients'.*only 4 distinct 'user' ids"):
        build_partition(text_cfg(tmp_path, leaf_file, num_clients=5))


def test_an_unknown_client_id_is_a_data_error(tmp_path, leaf_file):
    with pytest.raises(DataError, match=r"client id 7 is out of range"):
        load_client_datasets(text_cfg(tmp_path, leaf_file), 7)


def test_a_missing_file_is_one_error_naming_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "shakespeare.json.gz"
    with pytest.raises(
        DataError, match=r"'data\.path'.*no such file or folder: .*nowhere/shakespeare\.json\.gz"
    ):
        load_source(text_cfg(tmp_path, missing).data)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"users": []}, r"needs 'train' \(and 'test'\) LEAF json"),
        ({"train": {"users": ["A"]}}, r"'train' part of .* is not LEAF json"),
        ({"train": {"users": ["GHOST"], "user_data": {}}}, r"user 'GHOST' has no matching x / y lists"),
        ({"train": {"users": ["A"], "user_data": {"A": {"x": ["ab", "abc"], "y": ["c", "d"]}}}}, "mixes"),
        ({"train": {"users": ["A"], "user_data": {"A": {"x": ["ab"], "y": ["cd"]}}}}, "not one character"),
    ],
)
def test_a_file_that_is_not_leaf_json_names_the_path_and_the_problem(tmp_path, content, message):
    path = write_json(tmp_path / "bad.json.gz", content)
    with pytest.raises(DataError, match=message) as err:
        load_source(text_cfg(tmp_path, path).data)
    assert str(path) in str(err.value)


def test_a_file_that_is_not_gzip_json_is_a_data_error(tmp_path):
    path = tmp_path / "garbage.json.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"cannot read .*garbage\.json\.gz as \(gzipped\) json"):
        load_source(text_cfg(tmp_path, path).data)


def test_windows_of_another_length_than_data_seq_len_are_refused(tmp_path, leaf_file):
    with pytest.raises(DataError, match=r"'data\.seq_len'.*have 12 tokens, but data\.seq_len is 80"):
        load_source(text_cfg(tmp_path, leaf_file, extra="data.seq_len=80").data)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("run_config", "message"),
    [
        (
            {"dataset": "shakespeare"},
            r"'model\.arch': 'vit' reads image data.*use model\.arch 'char-transformer'",
        ),
        ({"model": "char-transformer"}, r"'model\.arch': 'char-transformer' reads text data.*'digits'"),
        (
            {"dataset": "shakespeare", "model": "char-transformer", "overrides": "data.modality=image"},
            r"'data\.modality': data\.source 'leaf-shakespeare' gives text data",
        ),
        (
            {"dataset": "shakespeare", "model": "char-transformer", "overrides": "data.num_classes=62"},
            r"'data\.num_classes'.*80-character vocabulary",
        ),
        ({"overrides": "data.modality=audio"}, r"'data\.modality': must be one of"),
        ({"overrides": "model.arch=rnn"}, r"'model\.arch': must be one of \('vit', 'char-transformer'\)"),
    ],
)
def test_model_and_data_modality_must_agree(run_config, message):
    with pytest.raises(ConfigError, match=message):
        load_config(run_config)


# --------------------------------------------------------------------------- model


def test_char_transformer_predicts_one_next_character_per_sequence(tmp_path, leaf_file):
    cfg = text_cfg(tmp_path, leaf_file)
    model = build_model(cfg)
    assert isinstance(model, CharTransformer)
    x = torch.randint(0, 80, (3, SEQ))
    assert model(x).shape == (3, 80)
    assert example_input(cfg).dtype == torch.int64 and example_input(cfg).shape == (1, SEQ)
    torch.testing.assert_close(build_model(cfg).state_dict()["pos_embed"], model.state_dict()["pos_embed"])


def test_char_transformer_has_the_vits_parameter_groups_with_token_embed_as_input_layer(tmp_path, leaf_file):
    model = build_model(text_cfg(tmp_path, leaf_file))
    groups = parameter_groups(model)
    assert groups["patch_embed"] == ("token_embed.weight",)
    assert groups["pos_embed"] == ("pos_embed",)
    assert "blocks.0.attn.qkv.weight" in groups["attn.qkv"] and "blocks.1.attn.qkv.bias" in groups["attn.qkv"]
    assert "blocks.0.attn.proj.weight" in groups["attn.proj"]
    assert {"blocks.0.norm1.weight", "blocks.0.norm2.weight", "norm.weight"} <= set(groups["norm"])
    assert "blocks.0.mlp.fc1.weight" in groups["mlp"]
    assert set(groups["head"]) == {"head.weight", "head.bias", "norm.weight", "norm.bias"}
    split = ParameterSplit.from_model(model, ["attn.qkv"])
    assert set(split.private) == set(groups["attn.qkv"]) and "token_embed.weight" in split.shared


def test_flops_of_a_one_block_char_transformer_match_a_hand_count():
    d, n, v = 8, SEQ, 80
    model = CharTransformer(vocab_size=v, seq_len=n, embed_dim=d, depth=1, num_heads=2, mlp_ratio=2.0)
    # the token lookup is no matmul; per token qkv, proj and MLP; scores and mix; the head on one position
    macs = n * (3 * d * d + d * d + 4 * d * d) + 2 * n * n * d + d * v
    assert flops_per_sample(model, torch.zeros((1, n), dtype=torch.int64)) == 2 * macs


# --------------------------------------------------------------------------- federation


@pytest.mark.parametrize("method", ["fedavg", "fedtp"])
def test_one_round_on_the_text_task_completes_for_fedavg_and_unchanged_fedtp(tmp_path, leaf_file, method):
    rc = fedhelpers.run_config(
        tmp_path,
        method,
        TINY,
        extra=f"data.path={leaf_file} data.seq_len={SEQ}",
        dataset="shakespeare",
        model="char-transformer",
    )
    _, results, _ = fedhelpers.federate(rc)
    assert results["status"] == "completed"
    assert sorted(results["rounds"][-1]["eval"]["per_client"], key=int) == ["0", "1", "2"]
    d = 16
    assert results["resources"]["flops_per_sample"] > 2 * SEQ * 8 * d * d


# --------------------------------------------------------------------------- the staged file


@pytest.mark.integration
def test_staged_leaf_shakespeare_has_ten_users_with_their_own_test_data(tmp_path, shared_data):
    path = shared_data / "shakespeare_leaf_subset.json.gz"
    if not path.is_file():
        pytest.skip(f"{path} is not staged")
    cfg = load_config(
        {
            "dataset": "shakespeare",
            "model": "char-transformer",
            "num-clients": 10,
            "data-dir": str(shared_data),
            "overrides": f"data.cache_dir={tmp_path / 'cache'}",
        }
    )
    src = load_source(cfg.data)
    # LEAF's num_samples says 4,671 test samples; its x / y lists hold 3,881 (79 fewer per user)
    assert (len(src.train), len(src.test)) == (41990, 3881)
    assert src.train.images[0].shape == (80,) and src.train.labels.max() < 80
    rows = summarize_partition(cfg)
    assert len({r["natural_id"] for r in rows}) == 10
    assert sum(r["n_train"] + r["n_val"] for r in rows) == 41990 and sum(r["n_test"] for r in rows) == 3881
