"""`melt-train compile`: a stage's real training step compiled ahead of time for this machine or for a
TPU topology (libtpu's compiler, no TPU needed), its per-device memory, and the exit status that says
whether it fits."""

import json
import pathlib
import shlex

import pytest

from melt_jax.aot import CompileReport, gpu_target_config, program_counts, topology_devices
from melt_jax.errors import ConfigError
from melt_jax.model import MeltConfig, OuroConfig, abstract_params, count_params, model_for
from melt_jax.sharding import make_mesh
from melt_jax.train.cli import build_parser
from melt_jax.train.cli import main as train_main
from melt_jax.train.compile import compile_stage
from melt_jax.train.config import load_train_config
from melt_jax.train.tasks import build_task

TINY = ["model=tiny", "vocab_size=258", "data.seq_len=64", "batch_size=8", "progress=false"]
FSDP = ["mesh.data=1", "mesh.fsdp=-1"]


def test_compile_on_this_machine_without_checkpoints(tmp_path, capsys):
    """A MELT phase-2 step compiles from configs alone: the teacher a preset-shaped config.json, the
    phase-1 student a MELT config.json; nothing is read or trained, nothing is written."""
    teacher = OuroConfig.preset("tiny", vocab_size=258)
    (tmp_path / "teacher.json").write_text(teacher.to_json_string())
    (tmp_path / "student.json").write_text(MeltConfig.from_ouro(teacher).to_json_string())
    args = ["compile", "stage=melt_phase2", f"teacher={tmp_path / 'teacher.json'}"]
    args += [f"init_from={tmp_path / 'student.json'}", "chunk_size=16", f"output_dir={tmp_path / 'run'}", *TINY]
    assert train_main(args) == 0
    out = capsys.readouterr().out
    for line in ("arguments", "temporaries", "peak", "flops", "fits           yes", "attention      auto on cpu"):
        assert line in out, out
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def v5p_reports():
    """LoopLM Stage I of the tiny model on a v5p with 4 chips (fsdp over all of them), each layer
    recomputed in the backward pass and attention blockwise, at 1,024 and 2,048 tokens."""
    reports = {}
    for seq_len in (1024, 2048):
        overrides = [*TINY, *FSDP, "batch_size=4", f"data.seq_len={seq_len}", "remat=full", "attention=blockwise"]
        reports[seq_len] = compile_stage(load_train_config(None, overrides), "v5p:2x2x1")
    return reports


def test_tpu_topology_compile_reports_per_chip_memory(v5p_reports):
    report = v5p_reports[1024]
    assert isinstance(report, CompileReport) and report.fits
    assert report.num_devices == 4 and report.device_kind.startswith("TPU v5")
    assert report.capacity is not None and 90 * 2**30 < report.capacity < 100 * 2**30  # v5p: 95.74 GiB
    assert report.peak == report.argument + report.output - report.alias + report.temp
    assert report.alias > 0  # the donated state is updated in place
    assert report.flops and report.flops > 0
    json.dumps(report.as_dict())  # the report serialises


def test_per_chip_memory_grows_linearly_with_the_sequence(v5p_reports):
    """Twice the tokens, at most twice the temporaries (1.5x measured: part of them does not grow);
    dense attention without remat grows 3.8x here."""
    short, long = v5p_reports[1024].temp, v5p_reports[2048].temp
    assert long <= 2.0 * short, (short, long)


def _tiny_melt_configs(tmp_path) -> list[str]:
    """Overrides naming a tiny teacher and phase-1 student by their config.json files."""
    teacher = OuroConfig.preset("tiny", vocab_size=258)
    (tmp_path / "teacher.json").write_text(teacher.to_json_string())
    (tmp_path / "student.json").write_text(MeltConfig.from_ouro(teacher).to_json_string())
    return [f"teacher={tmp_path / 'teacher.json'}", f"init_from={tmp_path / 'student.json'}"]


@pytest.mark.parametrize("stage", ["looplm", "melt_phase2"])
def test_splash_attention_compiles_for_a_tpu_topology(stage, tmp_path):
    """attention=splash: the Pallas kernel compiled by the TPU compiler (Stage I: the tokens attend to
    each other; MELT phase 2: the two-pass pattern, its pass 1 over the cache falling back), inside
    the scans over loops and layers, remat, and the shard_map over the fsdp mesh."""
    overrides = [*TINY, *FSDP, "batch_size=4", "data.seq_len=256", "remat=full", "attention=splash"]
    if stage == "melt_phase2":
        overrides += [f"stage={stage}", *_tiny_melt_configs(tmp_path), "chunk_size=64"]
    report = compile_stage(load_train_config(None, overrides), "v5p:2x2x1")
    assert report.fits and report.error is None, report.error
    assert report.temp > 0


def test_splash_is_the_kernel_for_a_tpu_and_its_interpreter_elsewhere():
    """The program being traced for a TPU topology's mesh calls the compiled kernel (a Mosaic custom
    call); traced for this CPU, it runs the kernel's interpreter (no custom call)."""
    import jax
    import jax.numpy as jnp

    from melt_jax.model.attention import Implementation, attend, causal_mask
    from melt_jax.sharding import MeshConfig, make_mesh

    q = jax.ShapeDtypeStruct((2, 256, 4, 128), jnp.bfloat16)
    positions = jnp.broadcast_to(jnp.arange(256, dtype=jnp.int32), (2, 256))

    def lowered_text(devices):
        mesh = make_mesh(MeshConfig(data=-1, num_devices=1), devices)
        splash = Implementation("splash")
        with jax.set_mesh(mesh):
            fn = jax.jit(
                lambda q: attend(q, q, q, causal_mask(positions, positions, in_order=True), implementation=splash)
            )
            return fn.lower(q).as_text()

    assert "tpu_custom_call" in lowered_text(topology_devices("v5p:2x2x1"))
    assert "tpu_custom_call" not in lowered_text(jax.devices())


def test_a_program_too_large_for_the_chip_exits_1(tmp_path, capsys):
    """Two layers of width 4,096 with an MLP of 32,768 are 0.8 B params: with their gradients and AdamW's
    two moments in float32 (16 bytes a param) they do not fit one 15.75 GiB v5e chip."""
    wide = OuroConfig.preset(
        "tiny", vocab_size=258, hidden_size=4096, intermediate_size=32768, num_attention_heads=32, head_dim=128
    )
    (tmp_path / "wide.json").write_text(wide.to_json_string())
    args = ["compile", f"model={tmp_path / 'wide.json'}", "batch_size=1", "data.seq_len=64", "mesh.num_devices=1"]
    assert train_main([*args, "--topology", "v5e:2x2"]) == 1
    out = capsys.readouterr().out
    assert "fits           NO" in out and "RESOURCE_EXHAUSTED" in out, out


def test_the_step_is_traced_for_the_devices_it_is_compiled_for(capsys):
    """The model makes the choices of the topology's platform from the first trace on (building the
    task included): asked for cuDNN attention (GPU only) when compiling for a TPU, it names the TPU."""
    args = ["compile", *TINY, "attention=cudnn", "dtype=bfloat16", "--topology", "v5p:2x2x1"]
    assert train_main(args) == 2
    assert "traced for backend 'tpu'" in capsys.readouterr().err


def test_bad_topologies_exit_2(capsys):
    assert train_main(["compile", *TINY, "--topology", "v99:2x2"]) == 2
    assert "v99:2x2" in capsys.readouterr().err
    assert train_main(["compile", *TINY, "--topology", "2x2x2"]) == 2
    assert "not of the form" in capsys.readouterr().err
    assert train_main(["stage", *TINY, "--topology", "v5p:2x2x1"]) == 2
    assert "--topology is an option of melt-train compile" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="v6e:3x3x3x3"):
        topology_devices("v6e:3x3x3x3")


@pytest.mark.parametrize("kind", ["ouro", "melt"])
def test_decode_step_never_copies_the_cache(kind):
    """The decode step compiled on CPU at 1,024 and 8,192 cache positions (float32, batch 3, 4 layers): the cache
    is donated and written in place, so the temporaries grow by at most the slot array being read (k
    and v of one loop and layer), never by the cache: with a copy of the cache they would grow by 8x
    the small cache's bytes. (Reading the filled part block by block, they grew by 86 KB when
    measured, far below one slot array.)"""
    import jax
    import jax.numpy as jnp

    from melt_jax.inference import decode_step
    from melt_jax.model import abstract_params, model_for

    ouro = OuroConfig.preset("tiny", vocab_size=258, num_hidden_layers=4)  # a slot array: 1/4 of MELT's cache
    model = model_for(ouro if kind == "ouro" else MeltConfig.from_ouro(ouro))
    token = jax.ShapeDtypeStruct((3,), jnp.int32)
    temp, cache_bytes, slot_bytes = {}, {}, {}
    for length in (1024, 8192):
        cache = jax.eval_shape(lambda n=length: model.init_cache(3, n))
        compiled = decode_step.lower(model, abstract_params(model), token, cache).compile()
        temp[length] = compiled.memory_analysis().temp_size_in_bytes
        cache_bytes[length] = 2 * cache.k.size * cache.k.dtype.itemsize
        num_slot_arrays = cache.k.size // (3 * ouro.num_kv_heads * length * ouro.head_dim)
        slot_bytes[length] = cache_bytes[length] // num_slot_arrays
    growth = temp[8192] - temp[1024]
    assert growth <= 1.1 * (slot_bytes[8192] - slot_bytes[1024]), (temp, slot_bytes)
    assert growth < 0.5 * (cache_bytes[8192] - cache_bytes[1024]), (temp, cache_bytes)


def test_gpu_targets_name_a_shipped_description_or_a_file(tmp_path):
    """`gpu:<name>`: the shipped H100 and H200 descriptions, or a target_config file; anything else
    is a ConfigError naming it. Without the CUDA build of jax (the cuda extra, not in the test extra)
    the device cannot be made: a ConfigError that says how to install it; with it, a compile-only
    device of the named kind."""
    assert 'device_description_str: "NVIDIA H200"' in gpu_target_config("h200")
    assert "device_memory_size: 85520809984" in gpu_target_config("H100")
    own = tmp_path / "mine.txtpb"
    own.write_text(gpu_target_config("h200"))
    assert gpu_target_config(str(own)) == gpu_target_config("h200")
    with pytest.raises(ConfigError, match="'a100'.*h100, h200"):
        topology_devices("gpu:a100")
    try:
        devices = topology_devices("gpu:h200")
    except ConfigError as e:
        assert "cuda extra" in str(e)
    else:
        assert [d.device_kind for d in devices] == ["NVIDIA H200"]


def test_program_counts_kernels_loops_and_conditionals():
    hlo = """
  %fusion.1 = f32[4]{0} fusion(%p), kind=kLoop, calls=%fused
  %mof = (f32[4]{0}, f32[4]{0}) fusion(%p), kind=kInput, calls=%fused2
  %gemm = (bf16[4,4]{1,0}, s8[0]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm"
  %while.3 = (s32[], f32[4]{0}) while(%tuple), condition=%cond, body=%body, metadata={op_name="x/while/body"}
  %conditional = (f32[4]{0}) conditional(%pred, %t, %f), true_computation=%a, false_computation=%b
  %loop_dynamic_update_slice_fusion = bf16[4,1024]{1,0} fusion(%cache, %row), kind=kLoop, calls=%dus
"""
    # Written: 16 + 2 x 16 + 32 bytes; the dynamic-update-slice kernel updates its cache in place.
    assert program_counts(hlo) == dict(kernels=4, while_loops=1, conditionals=1, kernel_writes=80)


def test_the_compile_example_of_the_docs_resolves_its_models_by_name():
    """docs/memory.md's `melt-train compile` command as written: its teacher (ouro-1.4b) and phase-1
    student (melt-1.6b) are presets, and the stage's task builds from them on this machine's 8 devices
    (abstract: nothing read; the compile itself for v5p is measured in docs/measured.md)."""
    docs = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "memory.md").read_text()
    command = docs.split("```bash\nmelt-train compile ", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    args = build_parser().parse_intermixed_args(["compile", *shlex.split(command)])
    assert args.topology == "v5p:2x2x2"
    cfg = load_train_config(args.config, args.overrides)
    task = build_task(cfg, make_mesh(cfg.mesh), abstract=True)
    assert task.config.model_type == "melt" and task.config.chunk_size == 500 and task.config.num_layers == 24
    assert 1.5e9 < count_params(task.init_params) < 1.7e9  # MELT-1.6B
    assert count_params(task.teacher_params) == count_params(abstract_params(model_for(OuroConfig.preset("ouro-1.4b"))))
    with pytest.raises(ConfigError, match="unknown preset 'melt-9b'; known presets: .*melt-1.6b"):
        OuroConfig.preset("melt-9b")
