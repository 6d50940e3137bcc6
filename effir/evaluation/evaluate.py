"""`effir.evaluate`: zero-shot LAReQA evaluation (XQuAD-R / MLQA-R) of a dual encoder.

Settings (arXiv 2408.10536, after LAReQA):

- Mo.: query language == pool language; the pool is that language's candidates (11 / 7 pairs).
- Cr.: query language != pool language; the pool is the pool language's candidates (110 / 42 pairs).
  A question is asked of a pool only if the pool's language has the question (always for XQuAD-R).
- Mul.: one pool of every candidate in every language; relevant = the answer sentence in each language.

Mo. and Cr. mAP and R@1 are means over queries per (query language, pool language) pair, then
macro-averaged over the pairs. Mul. mAP and R@10 are means over all questions (LAReQA's pooled mAP;
per query language in `mul_by_lang`). The rank distance (language bias) is the per-query max minus min
rank of the relevant candidates in the Mul. pool, averaged per query language, then macro-averaged.
Score = dot product of the encoder's outputs (E5 embeddings are L2-normalised: cosine).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from effir._validation import check_choice, check_tensor
from effir.evaluation import metrics as M
from effir.evaluation.lareqa import CANDIDATE_TEXTS, DATASETS, LareqaData, load_lareqa
from effir.evaluation.search import SEARCHES, rank_relevant, resolve_search


def _encode(fn, texts: list[str], what: str, batch_size: int, show_progress, cache=None, key="") -> torch.Tensor:
    """Encode each distinct text once; rows follow `texts`. Returns (len(texts), H) float32 on CPU."""
    uniq = list(dict.fromkeys(texts))
    if cache is None:
        emb = fn(uniq, batch_size=batch_size, show_progress=show_progress)
        check_tensor(f"encoder output for {what}", emb, shape=(len(uniq), None))
    else:
        emb = _encode_cached(fn, uniq, what, batch_size, show_progress, Path(cache), key)
    emb = emb.detach().to("cpu", torch.float32).contiguous()
    if len(uniq) == len(texts):
        return emb
    row = {t: i for i, t in enumerate(uniq)}
    return emb[torch.tensor([row[t] for t in texts], dtype=torch.int64)]


_CACHE_CHUNK = 1024


def _encode_cached(fn, uniq, what, batch_size, show_progress, cache: Path, key: str) -> torch.Tensor:
    """Encode in chunks of similar-length texts, each saved under `cache` by a hash of (key, kind, texts):
    an interrupted evaluation resumes where it stopped, and a repeated one encodes nothing."""
    from tqdm.auto import tqdm

    cache.mkdir(parents=True, exist_ok=True)
    order = sorted(range(len(uniq)), key=lambda i: (len(uniq[i]), uniq[i]))
    out = None
    show = show_progress if show_progress is not None else len(uniq) >= 2048
    with tqdm(total=len(uniq), desc=f"encoding {what} (cached)", unit="text", disable=not show) as bar:
        for a in range(0, len(order), _CACHE_CHUNK):
            idx = order[a:a + _CACHE_CHUNK]
            chunk = [uniq[i] for i in idx]
            digest = hashlib.sha256("\0".join([key, what, *chunk]).encode("utf-8")).hexdigest()[:32]
            path = cache / f"{what}-{digest}.pt"
            emb = torch.load(path) if path.is_file() else None
            if emb is None or emb.shape[0] != len(chunk):
                emb = fn(chunk, batch_size=batch_size, show_progress=False)
                check_tensor(f"encoder output for {what}", emb, shape=(len(chunk), None))
                emb = emb.detach().to("cpu", torch.float32).contiguous()
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                torch.save(emb, tmp)
                os.replace(tmp, path)  # atomic: a killed run never leaves a half-written chunk
            if out is None:
                out = torch.empty(len(uniq), emb.shape[1], dtype=torch.float32)
            out[torch.tensor(idx)] = emb
            bar.update(len(idx))
    return out


def encoder_fingerprint(encoder) -> str:
    """Name + a checksum of the model's parameters and buffers (cache key: trained weights differ)."""
    h = hashlib.sha256(str(getattr(encoder, "name", type(encoder).__name__)).encode())
    model = getattr(encoder, "model", None)
    if isinstance(model, torch.nn.Module):
        with torch.no_grad():
            for name, t in [*model.named_parameters(), *model.named_buffers()]:
                h.update(f"{name}{tuple(t.shape)}{t.dtype}{t.double().sum().item():.17g}"
                         f"{t.double().abs().sum().item():.17g}".encode())
    for attr in ("query_prefix", "passage_prefix", "pooling", "normalize", "max_length", "long_inputs"):
        h.update(f"{attr}={getattr(encoder, attr, None)}".encode())
    return h.hexdigest()[:32]


def _setting_stats(ranked, k: int) -> dict:
    ap = M.average_precision(ranked.scores, ranked.count_ge, ranked.mask)
    rec = M.recall_at_k(ranked.count_gt, ranked.mask, k)
    return {"ap": ap, "recall": rec}


def compute_metrics(data: LareqaData, q_emb: torch.Tensor, c_emb: torch.Tensor, *, search="auto",
                    device=None) -> dict:
    """All settings from precomputed embeddings: q_emb (n_questions, H), c_emb (n_candidates, H) float32."""
    check_tensor("q_emb", q_emb, shape=(len(data.q_text), None), dtypes=(torch.float32,))
    check_tensor("c_emb", c_emb, shape=(len(data.cand_text), q_emb.shape[1]), dtypes=(torch.float32,))
    langs = data.languages
    matrix, recall_matrix, pair_queries = {}, {}, {}
    for ql in langs:
        qidx = data.questions_in(ql)
        matrix[ql], recall_matrix[ql], pair_queries[ql] = {}, {}, {}
        for pl in langs:
            cidx = data.candidates_in(pl)
            local = np.full(len(data.cand_text), -1, dtype=np.int64)
            local[cidx] = np.arange(len(cidx))
            keep = [i for i in qidx if pl in data.answers[data.q_id[i]]]
            pair_queries[ql][pl] = len(keep)
            if not keep:  # no question of ql exists in pl (possible in MLQA-R subsets): no AP
                matrix[ql][pl] = recall_matrix[ql][pl] = None
                continue
            rel = torch.tensor([[local[data.answers[data.q_id[i]][pl]]] for i in keep], dtype=torch.int64)
            ranked = rank_relevant(q_emb[keep], c_emb[cidx], rel, search=search, device=device)
            stats = _setting_stats(ranked, k=1)
            matrix[ql][pl] = stats["ap"].mean().item()
            recall_matrix[ql][pl] = stats["recall"].mean().item()

    def macro(table, same):
        vals = [table[a][b] for a in langs for b in langs if (a == b) == same and table[a][b] is not None]
        return float(np.mean(vals)) if vals else None

    # Mul.: every question against the whole multilingual pool.
    lang_pos = {lang: i for i, lang in enumerate(langs)}
    rel = torch.full((len(data.q_text), len(langs)), -1, dtype=torch.int64)
    for i, qid in enumerate(data.q_id):
        for lang, c in data.answers[qid].items():
            rel[i, lang_pos[lang]] = c
    ranked = rank_relevant(q_emb, c_emb, rel, search=search, device=device)
    ap = M.average_precision(ranked.scores, ranked.count_ge, ranked.mask)
    r10 = M.recall_at_k(ranked.count_gt, ranked.mask, 10)
    dist = M.rank_distance(ranked.count_gt, ranked.mask)
    mul_by_lang = {}
    for ql in langs:
        sel = torch.from_numpy(data.questions_in(ql))
        if len(sel) == 0:
            continue
        mul_by_lang[ql] = {"map": ap[sel].mean().item(), "r10": r10[sel].mean().item(),
                           "rank_distance": dist[sel].mean().item(), "n_questions": len(sel)}
    return {
        "map": {"mo": macro(matrix, True), "cr": macro(matrix, False), "mul": ap.mean().item()},
        "recall": {"mo_r1": macro(recall_matrix, True), "cr_r1": macro(recall_matrix, False),
                   "mul_r10": r10.mean().item()},
        "rank_distance": float(np.mean([v["rank_distance"] for v in mul_by_lang.values()])),
        "matrix": matrix,
        "recall_matrix": recall_matrix,
        "pair_queries": pair_queries,
        "mul_by_lang": mul_by_lang,
        "n_pairs": {"mo": sum(matrix[a][a] is not None for a in langs),
                    "cr": sum(matrix[a][b] is not None for a in langs for b in langs if a != b)},
    }


def evaluate(
    encoder,
    dataset: str = "xquad-r",
    *,
    languages=None,
    max_paragraphs=None,
    seed: int = 0,
    batch_size: int = 64,
    search: str = "auto",
    candidate: str = "sentence",
    device=None,
    output=None,
    plot=None,
    show_progress=None,
    cache=None,
) -> dict:
    """Zero-shot LAReQA evaluation of `encoder` on "xquad-r" or "mlqa-r"; returns a JSON-ready dict.

    encoder: has `encode_queries(texts, batch_size=, show_progress=)` and `encode_passages(...)`, each
    returning an (N, H) float tensor (E5 prefixes are the encoder's business). languages: a subset of the
    data set's languages. max_paragraphs: None, an int (parallel paragraph groups) or a fraction in (0, 1]
    for fast runs; numbers on a subset are higher than on the full pools and comparable only to runs with
    the same subset (same value and seed). search: "auto" | "faiss" | "torch" (same numbers). device: where
    the torch search multiplies. output: a JSON path to write. plot: a PNG path for the query x pool
    language mAP heatmap, or True for output's name with ".png". cache: a directory for embedding chunks
    keyed by the encoder's weights and the texts, so a long CPU run that is interrupted resumes.

    Keys: dataset, model, map {mo, cr, mul}, recall {mo_r1, cr_r1, mul_r10}, rank_distance, matrix
    {qlang: {plang: mAP}}, recall_matrix (R@1), mul_by_lang, n_questions, n_candidates, settings, timing.
    """
    check_choice("dataset", dataset, tuple(DATASETS))
    check_choice("search", search, SEARCHES)
    check_choice("candidate", candidate, CANDIDATE_TEXTS)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    for name in ("encode_queries", "encode_passages"):
        if not callable(getattr(encoder, name, None)):
            raise ValueError(f"encoder must have a callable {name}(texts, batch_size=, show_progress=)")
    t0 = time.perf_counter()
    data = load_lareqa(dataset, languages=languages, max_paragraphs=max_paragraphs, seed=seed, candidate=candidate)
    t1 = time.perf_counter()
    key = encoder_fingerprint(encoder) if cache is not None else ""
    q_emb = _encode(encoder.encode_queries, data.q_text, "queries", batch_size, show_progress, cache, key)
    t2 = time.perf_counter()
    c_emb = _encode(encoder.encode_passages, data.cand_text, "passages", batch_size, show_progress, cache, key)
    t3 = time.perf_counter()
    backend = resolve_search(search, device)
    result = compute_metrics(data, q_emb, c_emb, search=backend, device=device)
    t4 = time.perf_counter()
    out = {
        "dataset": dataset,
        "model": str(getattr(encoder, "name", type(encoder).__name__)),
        **result,
        "n_questions": len(data.q_text),
        "n_candidates": len(data.cand_text),
        "n_paragraph_groups": data.n_groups,
        "settings": {
            "languages": list(data.languages), "max_paragraphs": max_paragraphs, "seed": seed,
            "candidate": candidate, "search": backend, "score": "dot", "batch_size": batch_size,
            "embedding_dim": int(q_emb.shape[1]), "lareqa_commit": DATASETS[dataset][0],
            "subset": max_paragraphs is not None,
        },
        "timing": {"load_s": t1 - t0, "encode_queries_s": t2 - t1, "encode_passages_s": t3 - t2,
                   "search_s": t4 - t3, "total_s": t4 - t0},
    }
    if plot:
        if plot is True:
            if output is None:
                raise ValueError("plot=True needs output= (the PNG goes next to it); pass a path instead")
            plot = Path(output).with_suffix(".png")
        from effir.evaluation.report import plot_matrix

        plot_matrix(out, plot)
        out["plot"] = str(plot)
    if output is not None:
        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return out
