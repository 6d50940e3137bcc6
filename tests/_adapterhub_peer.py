"""Runs in the peers env (transformers 4.57 + adapters 1.3): effir's injected adapters vs AdapterHub's.

    python tests/_adapterhub_peer.py parity  '{"configs": [...], "backends": [...]}'   -> JSON on stdout
    python tests/_adapterhub_peer.py memory  '{"configs": [...], "layers": 12, ...}'   -> JSON on stdout
    python tests/_adapterhub_peer.py interop '{"cases": [[preset, {overrides}], ...]}'   -> JSON on stdout
    python tests/_adapterhub_peer.py all '{"parity": {...}, "memory": {...}, "interop": {...}}'  -> all three

`parity`: a small random-weight XLM-R config with padding; the same backbone and the same (random, non-zero)
adapter weights in both; returns max abs / rel differences of every hidden state and of the adapter-weight
gradients. `interop`: adapters saved by AdapterHub loaded by effir.load_adapters and effir's saved with
format="adapterhub" loaded by AdapterHub (into a model with a head), hidden states compared; AdapterHub configs
effir cannot compute must fail to load with the field's name. `memory`: bytes of the distinct tensors autograd saves during one training-step forward
(parameters excluded), for the frozen backbone alone, AdapterHub and effir.
Needs effir importable (PYTHONPATH=<repo>).
"""
from __future__ import annotations

import json
import sys

import torch


def _config(hidden=96, layers=2, heads=4, inter=160):
    from transformers import XLMRobertaConfig

    return XLMRobertaConfig(vocab_size=120, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=inter, max_position_embeddings=80, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0, layer_norm_eps=1e-5)


def _inputs(batch, seq, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 120, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, seq // 2:] = 0  # padding in one sequence
    ids[1, seq // 2:] = 1
    return ids, mask


def _hub_adapter(hub, layer, loc, name):
    lay = hub.encoder.layer[layer]
    mod = lay.attention.output if loc == "mh_adapter" else lay.output
    return mod.adapters[name]


def _param_pairs(mine, theirs):
    """(effir parameter, AdapterHub parameter) of one adapter: down weight / bias, up weight / bias."""
    down = theirs.adapter_down[0]  # AdapterHub: Sequential(Linear, activation)
    return [(mine.down.weight, down.weight), (mine.down.bias, down.bias), (mine.up.weight, theirs.adapter_up.weight),
            (mine.up.bias, theirs.adapter_up.bias)]


def _pair(conf, cfg_name, backend, seed=0):
    """(AdapterHub model, effir model) with one backbone and identical random adapter weights."""
    import adapters
    from transformers import XLMRobertaModel

    from effir.adapters import add_adapters, find_adapter_sites

    torch.manual_seed(seed)
    base = XLMRobertaModel(conf)
    hub = XLMRobertaModel(conf)
    hub.load_state_dict(base.state_dict())
    adapters.init(hub)
    hub.add_adapter("a", config=cfg_name)
    hub.train_adapter("a")  # freezes the backbone, activates "a"
    eff = XLMRobertaModel(conf)
    eff.load_state_dict(base.state_dict())
    add_adapters(eff, cfg_name, "a", backend=backend)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer, loc, module in find_adapter_sites(eff):
            if "a" not in module.effir_adapters:
                continue
            mine = module.effir_adapters["a"]
            theirs = _hub_adapter(hub, layer, loc, "a")
            for p_mine, p_theirs in _param_pairs(mine, theirs):
                assert p_mine.shape == p_theirs.shape, (p_mine.shape, p_theirs.shape)
                val = torch.randn(p_mine.shape, generator=g) * 0.3  # never zeros: the up-projection matters
                p_mine.copy_(val)
                p_theirs.copy_(val)
            assert float(theirs.scaling) == mine.scaling, (theirs.scaling, mine.scaling)
    return hub, eff


def parity(args: dict) -> dict:
    from effir.adapters import find_adapter_sites

    conf = _config()
    ids, mask = _inputs(3, 13)
    out = {}
    for cfg_name in args["configs"]:
        for backend in args["backends"]:
            hub, eff = _pair(conf, cfg_name, backend)
            hub.train()  # dropout is 0: train mode only so that gradients flow like in training
            eff.train()
            oh = hub(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            oe = eff(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            w = torch.randn(oh.last_hidden_state.shape, generator=torch.Generator().manual_seed(7))
            (oh.last_hidden_state * w).sum().backward()
            (oe.last_hidden_state * w).sum().backward()
            hs = [((a - b).abs().max().item(), ((a - b).norm() / b.norm()).item())
                  for a, b in zip(oe.hidden_states, oh.hidden_states)]
            grads = []
            for layer, loc, module in find_adapter_sites(eff):
                if "a" not in module.effir_adapters:
                    continue
                mine, theirs = module.effir_adapters["a"], _hub_adapter(hub, layer, loc, "a")
                for pm, pt in _param_pairs(mine, theirs):
                    grads.append(((pm.grad - pt.grad).norm() / pt.grad.norm()).item())
            n_trainable = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (eff, hub)]
            backbone_grads = [n for n, p in eff.named_parameters() if p.grad is not None and "effir_adapters" not in n]
            out[f"{cfg_name}/{backend}"] = {
                "hidden_max_abs": max(h[0] for h in hs), "hidden_max_rel": max(h[1] for h in hs),
                "grad_max_rel": max(grads), "n_adapter_tensors": len(grads),
                "trainable_effir": n_trainable[0], "trainable_hub": n_trainable[1],
                "backbone_params_with_grad": backbone_grads,
            }
    return out


def _saved_bytes(model, ids, mask) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in params and ptr != 0:
            seen[ptr] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    out.sum().backward()
    return sum(seen.values())


def memory(args: dict) -> dict:
    from transformers import XLMRobertaModel

    conf = _config(hidden=args.get("hidden", 384), layers=args.get("layers", 12), heads=args.get("heads", 12),
                   inter=args.get("intermediate", 1536))
    ids, mask = _inputs(args.get("batch", 2), args.get("seq", 32))
    torch.manual_seed(0)
    plain = XLMRobertaModel(conf).train()
    for p in plain.parameters():
        p.requires_grad_(False)
    plain.embeddings.word_embeddings.weight.requires_grad_(True)  # something must need a gradient
    res = {"tokens": int(ids.numel()), "hidden": conf.hidden_size, "layers": conf.num_hidden_layers,
           "backbone_only": _saved_bytes(plain, ids, mask)}
    for cfg_name in args["configs"]:
        hub, eff = _pair(conf, cfg_name, args.get("backend", "recompute"))
        res[f"adapterhub/{cfg_name}"] = _saved_bytes(hub.train(), ids, mask)
        res[f"effir/{cfg_name}"] = _saved_bytes(eff.train(), ids, mask)
        res[f"bottleneck/{cfg_name}"] = eff.encoder.layer[0].output.effir_adapters["a"].bottleneck_size
    return res


def _hidden(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


def interop(args: dict) -> dict:
    """For each [preset, overrides]: AdapterHub -> effir and effir -> AdapterHub, max abs hidden-state difference
    against the model the adapter was saved from, and both sides' adapter parameter counts."""
    import tempfile
    import warnings

    import adapters
    from adapters import AdapterConfig as HubConfig
    from transformers import XLMRobertaForSequenceClassification, XLMRobertaModel

    import effir
    import effir.adapters

    conf = _config(layers=3)
    ids, mask = _inputs(2, 11)
    torch.manual_seed(0)
    base = XLMRobertaModel(conf, add_pooling_layer=False).eval().state_dict()

    def hub_model(head=False):
        m = (XLMRobertaForSequenceClassification(conf) if head else XLMRobertaModel(conf, add_pooling_layer=False))
        (m.roberta if head else m).load_state_dict(base)
        adapters.init(m)
        return m.eval()

    def effir_model():
        m = XLMRobertaModel(conf, add_pooling_layer=False)
        m.load_state_dict(base)
        return m.eval()

    def n_params(model, tag):
        return sum(p.numel() for n, p in model.named_parameters() if tag in n)

    out = {}
    g = torch.Generator().manual_seed(3)
    with tempfile.TemporaryDirectory() as tmp:
        for i, (preset, overrides) in enumerate(args["cases"]):
            key = f"{preset}/{json.dumps(overrides, sort_keys=True)}"
            hub = hub_model()
            hub.add_adapter("x", config=HubConfig.load(preset, **overrides))
            hub.set_active_adapters("x")
            with torch.no_grad():
                for n, p in hub.named_parameters():
                    if ".adapters.x." in n:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            hub_dir, eff_dir = f"{tmp}/hub{i}", f"{tmp}/eff{i}"
            # both of AdapterHub's weight files (its safetensors writer fails on ln_before's tied tensors)
            hub.save_adapter(hub_dir, "x", use_safetensors=bool(i % 2) and not overrides.get("ln_before"))
            eff = effir_model()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error")  # a supported config loads without a fallback warning
                    name = effir.load_adapters(eff, hub_dir, backend="reference")
            except ValueError as e:
                out[key] = {"error": str(e)}
                continue
            want = _hidden(hub, ids, mask)
            got = _hidden(eff, ids, mask)
            effir.save_adapters(eff, eff_dir, format="adapterhub")
            hub2 = hub_model(head=True)
            name2 = hub2.load_adapter(eff_dir)
            hub2.set_active_adapters(name2)
            back = _hidden(hub2.roberta, ids, mask)
            # effir's own format, converted without a model, loads into AdapterHub the same way
            effir.save_adapters(eff, f"{eff_dir}-effir")
            effir.adapters.convert_adapters(f"{eff_dir}-effir", f"{eff_dir}-conv", format="adapterhub")
            hub3 = hub_model()
            hub3.set_active_adapters(hub3.load_adapter(f"{eff_dir}-conv"))
            converted = _hidden(hub3, ids, mask)
            out[key] = {"name": name, "name_back": name2, "hub_to_effir_max_abs": (got - want).abs().max().item(),
                        "effir_to_hub_max_abs": (back - got).abs().max().item(),
                        "converted_to_hub_max_abs": (converted - got).abs().max().item(),
                        "adapter_output_change": (want - _hidden(effir_model(), ids, mask)).abs().max().item(),
                        "params_hub": n_params(hub, ".adapters.x."), "params_effir": n_params(eff, "effir_adapters"),
                        "params_back": n_params(hub2, ".adapters.x.")}
    return out


if __name__ == "__main__":
    cmd, payload = sys.argv[1], json.loads(sys.argv[2])
    commands = {"parity": parity, "memory": memory, "interop": interop}
    if cmd == "all":
        result = {k: commands[k](v) for k, v in payload.items()}
    else:
        result = commands[cmd](payload)
    print("RESULT " + json.dumps(result))
