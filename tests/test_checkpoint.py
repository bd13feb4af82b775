"""Checkpoint files: nothing in a file runs code on load, damaged and foreign files are named as such,
saving always saves."""
import copy
import functools
import os
import pickle
import subprocess
import sys
import warnings
import zipfile

import gymnasium as gym
import numpy as np
import pytest
import torch

from trpo_ext import TRPO, checkpoint, checkpoint_fields
from trpo_ext.cli import main as cli_main

FAST = dict(n_envs=2, n_steps=32, critic_epochs=1, seed=0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small trained CartPole agent's checkpoint (read it, never write to it)."""
    path = tmp_path_factory.mktemp("saved") / "model.pt"
    agent = TRPO("CartPole-v1", **FAST).learn(64, progress_bar=False)
    agent.save(path)
    agent.close()
    return path


def rewrite(src, dst, **changes):
    """A copy of checkpoint `src` at `dst` with some fields of its state replaced."""
    state = checkpoint.read(src)
    state.update(changes)
    checkpoint.write_atomic(state, dst)
    return dst


def with_rank_states(state: dict, **rank1) -> dict:
    """`state` (one process's) as a 2-rank save of every rank would write it: rank 1's own state a copy
    of rank 0's, with `rank1`'s fields replaced."""
    own = copy.deepcopy({key: state[key] for key, _, _ in checkpoint_fields.RANK_STATE_FIELD_TYPES})
    return {**state, "world_size": 2, "rank_states": [{**own, **rank1}]}


# ----------------------------------------------------------------------------- a file never runs code
class MakesMarker:
    """Unpickling this creates the directory `path`: what a malicious payload would do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_pickled_env_states_are_not_unpickled_unless_asked(saved, tmp_path):
    marker = tmp_path / "ran"
    path = rewrite(saved, tmp_path / "poisoned.pt", env_states=pickle.dumps([MakesMarker(marker)]))
    agent = TRPO.load(path)  # safe fallback: fresh envs from the registered id
    assert not marker.exists()
    assert agent.envs.num_envs == 2 and agent.num_timesteps == 64
    assert agent.learn(32, progress_bar=False).num_timesteps == 128
    assert cli_main(["eval", str(path), "--episodes", "1"]) == 0
    assert not marker.exists()
    with pytest.raises(Exception):  # the opt-in does unpickle (the payload is live): only for trusted files
        TRPO.load(path, restore_env_states=True)
    assert marker.exists()
    # Another rank's envs: unpickled only by that rank of a job of the saved world size, never here.
    other = tmp_path / "rank1"
    state = with_rank_states(checkpoint.read(saved), env_states=pickle.dumps([MakesMarker(other)]))
    checkpoint.write_atomic(state, tmp_path / "ranks.pt")
    for restore in (False, True):
        TRPO.load(tmp_path / "ranks.pt", restore_env_states=restore).close()
    assert not other.exists()


@pytest.mark.parametrize("env_id", ["Evil-v0", "posix:Evil-v0"])
def test_an_unregistered_saved_id_is_refused(saved, tmp_path, env_id):
    path = rewrite(saved, tmp_path / "m.pt", env_id=env_id)
    with pytest.raises(ValueError, match="which is not registered in this process; import the module"):
        TRPO.load(path)
    assert TRPO.load(path, env="CartPole-v1").num_timesteps == 64


def test_restore_env_states_continues_the_episodes(saved):
    agent = TRPO.load(saved, restore_env_states=True)
    assert agent.env_spec is gym.registry["CartPole-v1"] and agent.evaluate(1)[0] > 0
    # A save of every rank of 2, in one process: rank 0's envs and stream go on.
    state = with_rank_states(checkpoint.read(saved), generator=torch.Generator().manual_seed(5).get_state())
    checkpoint.write_atomic(state, saved.with_name("ranks.pt"))
    assert checkpoint.rank_states_problem(state, 2) is None
    assert checkpoint.rank_states_problem(state, 3) == ("each rank's envs and random stream continue only at the "
                                                        "world size that saved them (2)")
    assert checkpoint.rank_states_problem({**state, "rank_states": None}, 2).startswith("it holds rank 0's envs")
    ranks = TRPO.load(saved.with_name("ranks.pt"), restore_env_states=True)
    assert torch.equal(ranks.generator.get_state(), agent.generator.get_state())
    np.testing.assert_array_equal(ranks.collector.last_obs, agent.collector.last_obs)
    with pytest.raises(ValueError, match="cannot be combined with env="):
        TRPO.load(saved, env="CartPole-v1", restore_env_states=True)
    with pytest.warns(UserWarning, match="holds no env states"):
        TRPO.load(rewrite(saved, saved.with_name("no-states.pt"), env_states=None), restore_env_states=True)
    np.testing.assert_array_equal(agent.collector.last_obs, checkpoint.read(saved)["collector"]["last_obs"].numpy()
                                  .astype(np.float32))


# ----------------------------------------------------------------------------- save always saves
class ClassEntryPointEnv(gym.Env):
    observation_space = gym.spaces.Box(-1, 1, (3,))
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 1.0, False, bool(self.np_random.random() < 0.1), {}


@pytest.fixture
def class_entry_point_id():
    gym.register("TrpoExtClassEntryPoint-v0", entry_point=ClassEntryPointEnv)
    yield "TrpoExtClassEntryPoint-v0"
    del gym.registry["TrpoExtClassEntryPoint-v0"]


def test_save_with_a_class_entry_point(class_entry_point_id, tmp_path):
    agent = TRPO(class_entry_point_id, **FAST).learn(64, progress_bar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left out
        agent.save(tmp_path / "m.pt")
    loaded = TRPO.load(tmp_path / "m.pt")
    assert loaded.num_timesteps == 64 and loaded.evaluate(1)[0] > 0
    del gym.registry[class_entry_point_id]  # a process that does not register it
    with pytest.raises(ValueError, match="'TrpoExtClassEntryPoint-v0', which is not registered"):
        TRPO.load(tmp_path / "m.pt")
    gym.register(class_entry_point_id, entry_point=ClassEntryPointEnv)


def test_save_with_a_make_vec_env(tmp_path):
    vec = gym.make_vec("CartPole-v1", 3, vectorization_mode="sync",
                       vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP})
    agent = TRPO(vec, n_steps=32, critic_epochs=1, seed=0).learn(96, progress_bar=False)
    assert agent.evaluate(1)[0] > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        agent.save(tmp_path / "m.pt")
    loaded = TRPO.load(tmp_path / "m.pt")
    assert loaded.envs.num_envs == 3 and loaded.num_timesteps == 96
    np.testing.assert_array_equal(loaded.predict(np.zeros((5, 4)), deterministic=True)[0],
                                  agent.predict(np.zeros((5, 4)), deterministic=True)[0])


def test_what_cannot_be_saved_about_the_env_is_left_out_with_a_warning(tmp_path):
    agent = TRPO(lambda: ClassEntryPointEnv(), **FAST).learn(64, progress_bar=False)  # no registered id
    with pytest.warns(UserWarning, match="no registered id and is not saved: TRPO.load will need env="):
        agent.save(tmp_path / "m.pt")
    with pytest.raises(ValueError, match="trained on an env without a registered id; pass env="):
        TRPO.load(tmp_path / "m.pt")
    loaded = TRPO.load(tmp_path / "m.pt", env=lambda: ClassEntryPointEnv())
    assert loaded.num_timesteps == 64 and loaded.envs.num_envs == 2

    pendulum = TRPO(lambda: gym.make("Pendulum-v1", g=5.0), **FAST)
    with pytest.warns(UserWarning, match="kwargs .*'g': 5.0.* are not saved"):
        pendulum.save(tmp_path / "p.pt")
    assert TRPO.load(tmp_path / "p.pt").envs.envs[0].unwrapped.g == 10.0


# ----------------------------------------------------------------------------- damaged and foreign files
class Foreign:
    pass


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("make, message", [
    (lambda p, good: _write(p, b""), r"is not a trpo_ext checkpoint \(the file is empty\)"),
    (lambda p, good: _write(p, good[: len(good) // 2]), "is damaged"),
    (lambda p, good: _write(p, np.random.default_rng(0).bytes(5000)), "is not a trpo_ext checkpoint"),
    (lambda p, good: _write(p, b"hello, this is a text file\n" * 10), r"is not a trpo_ext checkpoint \(a text file\)"),
    (lambda p, good: _write(p, b"step,reward\n1,0.5\n"), r"is not a trpo_ext checkpoint \(a text file\)"),
    (lambda p, good: _write(p, b'{"policy": "MlpPolicy"}'), r"is not a trpo_ext checkpoint \(a text file\)"),
    (lambda p, good: _write(p, b'cos\nsystem\n(S"echo hi"\ntR.'), r"is not a trpo_ext checkpoint \(a text file\)"),
    (lambda p, good: _sb3_zip(p), r"is not a trpo_ext checkpoint \(it is an sb3 model: load it with sb3"),
    (lambda p, good: _zip(p, {"notes.txt": "x"}), "is not a trpo_ext checkpoint .*zip archive torch.save did not write"),
    (lambda p, good: _write(p, pickle.dumps({"format": 2}, protocol=2)), "is not a trpo_ext checkpoint"),
    (lambda p, good: torch.save({"something": 1}, p), r"is not a trpo_ext checkpoint \(it holds a dict with keys"),
    (lambda p, good: torch.save([1, 2], p), r"is not a trpo_ext checkpoint \(it holds a list"),
    (lambda p, good: torch.save({"x": Foreign()}, p), r"is not a trpo_ext checkpoint \(the file holds objects other "
                                                      r"than plain data and tensors: test_checkpoint.Foreign\)"),
    (lambda p, good: torch.save({"format": 3, "sha256": "0" * 64, "payload": b"x"}, p), "is damaged .*sha256"),
    (lambda p, good: checkpoint.write_atomic({"format": 3, "policy": {}}, p), "is damaged .*no 'hyperparameters'"),
    (lambda p, good: checkpoint.write_atomic([1, 2], p), r"is damaged \(the payload is a list, not a dict\)"),
], ids=["empty", "truncated", "random-bytes", "text", "csv", "json", "pickle-as-text", "sb3", "zip", "plain-pickle",
        "foreign-dict", "foreign-list",
        "foreign-object", "bad-checksum", "missing-keys", "payload-not-a-dict"])
def test_damaged_or_foreign_files_are_named_as_such(saved, tmp_path, make, message):
    path = tmp_path / "file.pt"
    make(path, saved.read_bytes())
    with pytest.raises(ValueError, match=f"file.pt {message}") as info:
        TRPO.load(path)
    # torch's advice to retry with weights_only=False is wrong here and unsafe: never passed on, nor chained
    assert "weights_only" not in str(info.value) and info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__


def _zip(path, entries: dict):
    with zipfile.ZipFile(path, "w") as z:
        for entry, text in entries.items():
            z.writestr(entry, text)
    return path


def _sb3_zip(path):
    """What stable-baselines3's save writes (sb3-contrib's TRPO too), its entries' contents aside."""
    return _zip(path, {"data": "{}", "pytorch_variables.pth": "", "policy.pth": "", "policy.optimizer.pth": "",
                       "_stable_baselines3_version": "2.3.2", "system_info.txt": ""})


@pytest.mark.parametrize("field, value, expected", [
    ("hyperparameters", [1, 2], "hyperparameters is a list, expected a dict"),
    ("policy", {"layers.0.weight": 3}, r"policy\['layers.0.weight'\] is a int, expected a dense tensor"),
    ("num_timesteps", "64", "num_timesteps is a str, expected an int"),
    ("num_timesteps", True, "num_timesteps is a bool, expected an int"),
    ("env_id", 3, "env_id is a int, expected a string or None"),
    ("env_states", "abc", "env_states is a str, expected bytes or None"),
    ("rank_states", "abc", "rank_states is a str, expected a list or None"),
    ("sde", "abc", "sde is a str, expected a dict or None"),
    ("world_size", 2.0, "world_size is a float, expected an int"),
    ("policy_class", None, "policy_class is a NoneType, expected a string"),
    ("critic_optimizer", [], "critic_optimizer is a list, expected a dict"),
    ("format", 2, "the payload says format 2, the file 3"),
    ("spaces", {"observation": "Box(4)"}, "spaces is .*, expected the observation and action spaces in words"),
    ("network_names", {"policy": "MlpPolicy"}, "network_names is .*, expected a dict of built-in names .*"),
    ("network_names", {"policy": "os.system", "value_net": None}, "network_names is .*, expected a dict of built-in .*"),
    ("collector", {"stats": {}}, "collector: no 'last_obs', 'last_masks', 'mask_source', 'normalizer', "
                                 "'reward_scaler'"),
])
def test_fields_of_the_wrong_type_are_damage(saved, tmp_path, field, value, expected):
    path = rewrite(saved, tmp_path / "m.pt", **{field: value})
    with pytest.raises(ValueError, match=f"m.pt is damaged \\({expected}\\)"):
        TRPO.load(path)


def test_flipped_bytes_in_the_middle_are_detected(saved, tmp_path):
    data = bytearray(saved.read_bytes())
    middle = len(data) // 2
    data[middle: middle + 64] = bytes(b ^ 0xFF for b in data[middle: middle + 64])
    path = _write(tmp_path / "flipped.pt", bytes(data))
    with pytest.raises(ValueError, match="flipped.pt is damaged"):
        TRPO.load(path)


@pytest.mark.parametrize("field", [key for key, _, _ in checkpoint_fields.FIELD_TYPES
                                   if key not in checkpoint_fields.OPTIONAL_FIELDS])
def test_every_field_is_required(saved, tmp_path, field):
    state = checkpoint.read(saved)
    del state[field]
    checkpoint.write_atomic(state, tmp_path / "m.pt")
    with pytest.raises(ValueError, match=f"m.pt is damaged \\(no '{field}'\\)"):
        TRPO.load(tmp_path / "m.pt")


def test_a_file_written_before_rank_states_loads_as_one_process(saved, tmp_path):
    state = checkpoint.read(saved)
    del state["rank_states"]
    checkpoint.write_atomic(state, tmp_path / "m.pt")
    assert checkpoint.read(tmp_path / "m.pt")["rank_states"] is None
    agent = TRPO.load(tmp_path / "m.pt", restore_env_states=True)
    assert agent.num_timesteps == 64 and agent.learn(64, progress_bar=False).num_timesteps == 128


@pytest.mark.parametrize("field, value, expected", [
    (None, None, r"collector: no '{field}'"),
    ("stats", [], "collector: stats is a list, expected a dict"),
    ("last_masks", [[True]], "collector: last_masks is a list, expected a tensor or None"),
    ("mask_source", 1, "collector: mask_source is a int, expected a string or None"),
    ("normalizer", "none", "collector: normalizer is a str, expected a dict or None"),
    ("memory", [], "collector: memory is a list, expected a dict or None"),
    ("memory", {"policy_state": None, "value_state": None, "episode_starts": torch.zeros(2)},
     r"collector: memory\['episode_starts'\] is a torch.float32 tensor of shape \(2,\), expected torch.bool tensor"),
    ("memory", {"policy_state": [torch.zeros(1, 3, 4)], "value_state": None, "episode_starts": torch.zeros(2, dtype=bool)},
     r"collector: memory\['policy_state'\]\[0\] has shape \(1, 3, 4\), expected \(layers, 2, hidden\)"),
])
def test_every_collector_field_is_required_and_checked(saved, tmp_path, field, value, expected):
    """Every field but the optional ones (older files lack them) is required; each is checked."""
    required = [k for k, _, _ in checkpoint_fields.COLLECTOR_FIELD_TYPES if k not in checkpoint_fields.OPTIONAL_COLLECTOR_FIELDS]
    for key in required if field is None else [field]:
        state = checkpoint.read(saved)
        if field is None:
            del state["collector"][key]
        else:
            state["collector"][key] = value
        checkpoint.write_atomic(state, tmp_path / "m.pt")
        with pytest.raises(ValueError, match=f"m.pt is damaged \\({expected.format(field=key)}\\)"):
            TRPO.load(tmp_path / "m.pt")


def test_what_save_writes_is_what_read_checks(saved):
    agent = TRPO.load(saved)
    state = checkpoint.read(saved)
    assert list(state) == [key for key, _, _ in checkpoint_fields.FIELD_TYPES]
    assert list(agent.collector.state_dict()) == [key for key, _, _ in checkpoint_fields.COLLECTOR_FIELD_TYPES]


def test_earlier_formats_are_not_checkpoints(saved, tmp_path):
    state = checkpoint.read(saved)
    state["format"] = 2
    torch.save(state, tmp_path / "v2.pt")  # the state dict itself, unwrapped
    with pytest.raises(ValueError, match=r"v2.pt is not a trpo_ext checkpoint \(it holds a dict with keys .*, not a "
                                         r"TRPO checkpoint of format 3\)"):
        TRPO.load(tmp_path / "v2.pt")


def test_saves_leave_no_temporary_files(saved, tmp_path, monkeypatch):
    agent = TRPO.load(saved)
    path = tmp_path / "model.pt"
    for _ in range(3):
        agent.save(path)
    assert os.listdir(tmp_path) == ["model.pt"]
    before = path.read_bytes()

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        agent.learn(32, progress_bar=False).save(path)
    assert os.listdir(tmp_path) == ["model.pt"] and path.read_bytes() == before
    monkeypatch.undo()
    assert TRPO.load(path).num_timesteps == 64


def _optimizer_state(state, change):
    state = copy.deepcopy(state)
    change(state["critic_optimizer"])
    return state


@pytest.mark.parametrize("change, message", [
    (lambda o: o["state"][0].update(exp_avg=torch.zeros(3)), r"state\[0\]\['exp_avg'\]: .*shape \(3,\)"),
    (lambda o: o["state"][1].update(exp_avg_sq=o["state"][1]["exp_avg_sq"].double()),
     r"state\[1\]\['exp_avg_sq'\]: torch.float64"),
    (lambda o: o["state"][0].update(exp_avg=o["state"][0]["exp_avg"].t().contiguous().t()),
     r"state\[0\]\['exp_avg'\]: .*not contiguous"),
    (lambda o: o["state"][0].update(step=torch.tensor([1.0, 2.0])), r"state\[0\]\['step'\]: must be a 1-element"),
    (lambda o: o["state"][0].update(step=3), r"state\[0\]\['step'\]: must be a 1-element float tensor, got a int"),
    (lambda o: o["state"][0].pop("exp_avg_sq"), r"state\[0\]: fields 'exp_avg', 'step', expected 'exp_avg', 'exp_avg_sq'"),
    (lambda o: o["state"].update({99: {}}), r"state\[99\]: no such parameter"),
    (lambda o: o["param_groups"][0].update(params=[1, 0]), r"param_groups: parameters \[1, 0\], expected 0, 1"),
], ids=["shape", "dtype", "contiguous", "step-shape", "step-type", "missing", "extra", "groups"])
def test_optimizer_state_is_validated_before_use(saved, tmp_path, change, message):
    state = checkpoint.read(saved)
    assert len(state["critic_optimizer"]["state"]) == 6  # the value net's 3 layers, trained
    checkpoint.write_atomic(_optimizer_state(state, change), tmp_path / "opt.pt")
    with pytest.raises(ValueError, match=f"opt.pt is damaged \\(critic_optimizer {message}"):
        TRPO.load(tmp_path / "opt.pt")
    state["critic_optimizer"]["param_groups"][0]["params"] = [0]  # too few: known once the critic is built
    checkpoint.write_atomic(_optimizer_state(state, lambda o: o["state"].clear()), tmp_path / "opt.pt")
    with pytest.raises(ValueError, match=r"opt.pt is damaged \(critic_optimizer param_groups: 1 parameters, the value "
                                         r"net has 6\)"):
        TRPO.load(tmp_path / "opt.pt")


# ----------------------------------------------------------------------------- a save writes its own file only
def test_a_save_never_writes_through_a_planted_link(saved, tmp_path, monkeypatch):
    agent = TRPO.load(saved)
    victim, path = tmp_path / "victim", tmp_path / "model.pt"
    victim.write_bytes(b"precious")
    (tmp_path / "model.pt.tmp").symlink_to(victim)  # where saves used to put their temporary file
    agent.save(path)
    assert victim.read_bytes() == b"precious" and (tmp_path / "model.pt.tmp").is_symlink()
    assert not path.is_symlink() and TRPO.load(path).num_timesteps == 64
    # The temporary file is created exclusively: a link planted at its very name is an error, never followed.
    monkeypatch.setattr(checkpoint.secrets, "token_hex", lambda n: "guessed")
    (tmp_path / ".model.pt.guessed.tmp").symlink_to(victim)
    before = sorted(os.listdir(tmp_path)), path.read_bytes()
    with pytest.raises(FileExistsError):
        agent.save(path)
    assert victim.read_bytes() == b"precious" and (sorted(os.listdir(tmp_path)), path.read_bytes()) == before


@pytest.mark.parametrize("kind", ["symlink", "directory", "FIFO"])
def test_a_save_replaces_only_a_regular_file(saved, tmp_path, kind):
    agent = TRPO.load(saved)
    victim, path = tmp_path / "victim", tmp_path / "model.pt"
    victim.write_bytes(b"precious")
    {"symlink": lambda: path.symlink_to(victim), "directory": path.mkdir, "FIFO": lambda: os.mkfifo(path)}[kind]()
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError, match=f"save: .*model.pt is a {kind}, not a regular file; a save replaces only"):
        agent.save(path)
    assert sorted(os.listdir(tmp_path)) == before and victim.read_bytes() == b"precious"


# ----------------------------------------------------------------------------- what is not a file is not opened
def test_a_directory_or_a_device_is_refused_before_it_is_opened(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint.os, "open", lambda *a, **k: pytest.fail("opened"))
    for path, what in ((tmp_path, "a directory"), ("/dev/null", "a character device")):
        with pytest.raises(ValueError, match=rf"is not a trpo_ext checkpoint \(it is {what}, not a regular file\)"):
            TRPO.load(path)


def test_a_fifo_is_refused_not_waited_on(tmp_path):
    fifo, link = tmp_path / "model.pt", tmp_path / "link.pt"
    os.mkfifo(fifo)
    link.symlink_to(fifo)
    # Opening a FIFO to read waits for a writer: a subprocess with a timeout, so a regression fails, never hangs.
    code = "import sys\nfrom trpo_ext import TRPO\nfor p in sys.argv[1:]:\n    try:\n        TRPO.load(p)\n" \
           "    except ValueError as e:\n        print(e)"
    out = subprocess.run([sys.executable, "-c", code, str(fifo), str(link)], capture_output=True, text=True, timeout=120)
    assert out.stdout.splitlines() == [f"{p} is not a trpo_ext checkpoint (it is a FIFO, not a regular file)"
                                       for p in (fifo, link)], out.stderr[-2000:]


# ----------------------------------------------------------------------------- hostile checkpoints
@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A checkpoint with every field in use (observation and reward normalization), to be altered."""
    path = tmp_path_factory.mktemp("hostile") / "model.pt"
    agent = TRPO("CartPole-v1", normalize_obs=True, normalize_reward=True, **FAST).learn(64, progress_bar=False)
    agent.save(path)
    agent.close()
    return path


DROP = object()
NAN = float("nan")


def hostile_case(*path, value, message, id):
    """The field at `path` set to `value` (DROP: removed; a callable: applied to the saved value);
    loading is refused with "m.pt is damaged (MESSAGE" (or "m.pt MESSAGE" when it does not fit the env)."""
    return pytest.param(path, value, message, id=id)


HOSTILE = [
    hostile_case("hyperparameters", "cg_iters", value=2**62, id="cg-iters",
                 message="hyperparameters: cg_iters must be an int >= 1 and <= 10000, got 4611686018427387904"),
    hostile_case("hyperparameters", "max_backtracks", value=10**9, id="max-backtracks",
                 message="hyperparameters: max_backtracks must be an int >= 1 and <= 10000"),
    hostile_case("hyperparameters", "critic_epochs", value=2**62, id="critic-epochs",
                 message="hyperparameters: critic_epochs must be an int >= 0 and <= 10000"),
    hostile_case("hyperparameters", "n_envs", value=10**12, id="n-envs",
                 message="hyperparameters: n_envs must be an int >= 1 and <= 65536, got 1000000000000"),
    hostile_case("hyperparameters", "cg_rtol", value=NAN, id="cg-rtol", message=r"hyperparameters: cg_rtol must be a finite"),
    hostile_case("hyperparameters", "normalize_obs", value="yes", id="bool-string",
                 message="hyperparameters: normalize_obs must be True or False"),
    hostile_case("hyperparameters", "log_dir", value="/tmp/elsewhere", id="log-dir",
                 message="hyperparameters: unknown keys 'log_dir'; a checkpoint holds TRPO's hyperparameters: n_envs"),
    hostile_case("hyperparameters", "gamma", value=DROP, id="no-gamma", message="hyperparameters: no 'gamma'"),
    hostile_case("hyperparameters", "seed", value=None, id="no-seed", message="hyperparameters: seed is None"),
    hostile_case("hyperparameters", "policy_kwargs", value={"hidden": (2**20, 2**20)}, id="huge-hidden",
                 message=r"policy holds \d+ numbers; a MlpPolicy of hidden widths \(1048576, 1048576\)"),
    hostile_case("policy", "layers.0.weight", value=lambda t: torch.full_like(t, NAN), id="nan-weights",
                 message=r"policy\['layers.0.weight'\] holds NaN or Inf"),
    hostile_case("value_net", "layers.2.bias", value=lambda t: t / 0, id="inf-bias",
                 message=r"value_net\['layers.2.bias'\] holds NaN or Inf"),
    hostile_case("policy", 3, value=torch.zeros(1), id="param-name", message="policy has the key 3, expected"),
    hostile_case("generator", value=torch.zeros(7, dtype=torch.uint8), id="generator-size",
                 message=r"generator has shape \(7,\), expected \(5056,\)"),
    hostile_case("generator", value=lambda t: t.float(), id="generator-dtype",
                 message="generator is a torch.float32 tensor of shape .*, expected torch.uint8"),
    hostile_case("generator_device", value="tpu", id="generator-device",
                 message=r"generator_device is 'tpu', expected one of \['cpu', 'cuda'\]"),
    hostile_case("num_timesteps", value=-1, id="timesteps", message="num_timesteps must be an int >= 0 and <="),
    hostile_case("n_updates", value=10**6, id="updates", message="n_updates must be an int >= 0 and <= 64, got 1000000"),
    hostile_case("world_size", value=0, id="world-size", message="world_size must be an int >= 1"),
    hostile_case("critic_optimizer", "param_groups", 0, "lr", value=NAN, id="adam-lr",
                 message=r"critic_optimizer param_groups\[0\]\['lr'\] is nan, expected 0.001"),
    hostile_case("critic_optimizer", "param_groups", 0, "betas", value=(2.0, 0.5), id="adam-betas",
                 message=r"critic_optimizer param_groups\[0\]\['betas'\] is \(2.0, 0.5\)"),
    hostile_case("critic_optimizer", "state", 0, "exp_avg_sq", value=lambda t: t - 1, id="adam-negative",
                 message=r"critic_optimizer state\[0\]\['exp_avg_sq'\] holds values < 0.0"),
    hostile_case("critic_optimizer", "state", 0, "step", value=torch.tensor(NAN), id="adam-step",
                 message=r"critic_optimizer state\[0\]\['step'\] holds NaN or Inf"),
    hostile_case("collector", "normalizer", value="running", id="normalizer-string",
                 message="collector: normalizer is a str, expected a dict or None"),
    hostile_case("collector", "normalizer", value=None, id="normalizer-missing",
                 message="collector: normalizer is None, but hyperparameters normalize_obs is True"),
    hostile_case("collector", "normalizer", "mean", value="0", id="mean-string",
                 message=r"collector: normalizer\['mean'\] is a str, expected a dense tensor"),
    hostile_case("collector", "normalizer", "var", value=lambda t: -t, id="negative-variance",
                 message=r"collector: normalizer\['var'\] holds values < 0.0"),
    hostile_case("collector", "normalizer", "var", value=lambda t: t[:3], id="variance-shape",
                 message=r"collector: normalizer\['var'\] has shape \(3,\), expected \(4,\)"),
    hostile_case("collector", "normalizer", "count", value=0.0, id="count",
                 message=r"collector: normalizer\['count'\] is 0.0, expected a finite number > 0"),
    hostile_case("collector", "normalizer", "clip", value=1e9, id="clip",
                 message=r"collector: normalizer\['clip'\] is 1000000000.0, expected 10.0"),
    hostile_case("collector", "normalizer", value=lambda n: {**n, "mean": n["mean"][:3], "var": n["var"][:3]},
                 id="normalizer-width", message=r"does not fit this env: the model normalizes 3 observation features, "
                                                r"the env's observation space Box\(.*\) has 4"),
    hostile_case("collector", "reward_scaler", "returns", value=torch.zeros(5, dtype=torch.float64), id="returns-shape",
                 message=r"collector: reward_scaler\['returns'\] has shape \(5,\), expected \(2,\)"),
    hostile_case("collector", "reward_scaler", "stats", "var", value=lambda t: t.float(), id="reward-var-dtype",
                 message=r"collector: reward_scaler\['stats'\]\['var'\] is a torch.float32 tensor"),
    hostile_case("collector", "stats", "lengths", value=lambda t: t - 10**6, id="lengths",
                 message=r"collector: stats\['lengths'\] holds values < 0"),
    hostile_case("collector", "stats", "finished", value=[(1.0, 0)], id="finished",
                 message=r"collector: stats\['finished'\] must be a list of at most stats_window"),
    hostile_case("collector", "last_obs", value=lambda t: t[:1], id="obs-rows",
                 message=r"collector: last_obs has shape \(1, 4\), expected \(2, \.\.\.\): one row per env"),
    hostile_case("collector", "last_obs", value=lambda t: t * NAN, id="obs-nan", message="collector: last_obs holds NaN"),
    hostile_case("collector", "mask_source", value="magic", id="mask-source",
                 message="collector: mask_source is 'magic', expected one of"),
    hostile_case("spaces", "extra", value="x", id="spaces", message="spaces is .*, expected the observation and action"),
    # A 2-rank save of every rank (with_rank_states): rank 1's own state.
    hostile_case("rank_states", value={"generator": 1}, id="ranks-dict",
                 message="rank_states is a dict, expected a list or None"),
    hostile_case("rank_states", value=lambda ranks: ranks * 3, id="ranks-count",
                 message=r"rank_states holds 3 entries; world_size is 2, so expected 1 \(ranks 1 to 1\) or None"),
    hostile_case("rank_states", 0, value="state", id="rank-string",
                 message="rank_states: rank 1 is 'state', expected a dict of 'generator', 'collector', 'env_states'"),
    hostile_case("rank_states", 0, "code", value="os.system", id="rank-extra-key",
                 message="rank_states: rank 1 is .*, expected a dict of 'generator', 'collector', 'env_states'"),
    hostile_case("rank_states", 0, "collector", value=DROP, id="rank-no-collector",
                 message="rank_states: rank 1: no 'collector'"),
    hostile_case("rank_states", 0, "env_states", value=[b"x"], id="rank-env-states",
                 message="rank_states: rank 1: env_states is a list, expected bytes or None"),
    hostile_case("rank_states", 0, "generator", value=torch.zeros(7, dtype=torch.uint8), id="rank-generator",
                 message=r"rank_states: rank 1: generator has shape \(7,\), expected \(5056,\)"),
    hostile_case("rank_states", 0, "collector", "last_obs", value=lambda t: t * NAN, id="rank-obs-nan",
                 message="rank_states: rank 1: collector: last_obs holds NaN"),
    hostile_case("rank_states", 0, "collector", "stats", "lengths", value=lambda t: t - 10**6, id="rank-lengths",
                 message=r"rank_states: rank 1: collector: stats\['lengths'\] holds values < 0"),
    hostile_case("rank_states", 0, "collector", "reward_scaler", "returns", value=torch.zeros(5, dtype=torch.float64),
                 id="rank-returns", message=r"rank_states: rank 1: collector: reward_scaler\['returns'\] has shape"),
    hostile_case("rank_states", 0, "collector", "normalizer", "mean", value=lambda t: t + 1, id="rank-normalizer",
                 message="rank_states: rank 1: collector normalizer differs from rank 0's; the ranks hold the same "
                         "statistics"),
    hostile_case("rank_states", 0, "collector", "reward_scaler", "stats", "count", value=lambda c: c + 1,
                 id="rank-return-statistics",
                 message=r"rank_states: rank 1: collector reward_scaler\['stats'\] differs from rank 0's"),
]


@pytest.fixture(scope="module")
def hostile_sde(tmp_path_factory):
    """A gSDE agent's checkpoint (its `sde` field: the noise matrices), to be altered."""
    path = tmp_path_factory.mktemp("hostile_sde") / "model.pt"
    agent = TRPO("Pendulum-v1", use_sde=True, sde_sample_freq=4, **FAST).learn(64, progress_bar=False)
    agent.save(path)
    agent.close()
    return path


HOSTILE_SDE = [
    hostile_case("sde", value=None, id="sde-none",
                 message=r"sde is None, expected the noise state \(hyperparameters use_sde is True\)"),
    hostile_case("hyperparameters", "use_sde", value=False, id="sde-without-use-sde",
                 message=r"sde is a dict, expected None \(hyperparameters use_sde is False\)"),
    hostile_case("sde", "extra", value=1, id="sde-key",
                 message="sde is (?s:.*), expected a dict of 'noise', 'step'"),
    hostile_case("sde", "noise", value=lambda t: t * NAN, id="sde-nan", message=r"sde\['noise'\] holds NaN or Inf"),
    hostile_case("sde", "noise", value=lambda t: t.long(), id="sde-int",
                 message=r"sde\['noise'\] is a torch.int64 tensor .*, expected a floating tensor"),
    hostile_case("sde", "noise", value=lambda t: t[0], id="sde-rank",
                 message=r"sde\['noise'\] has shape \(64, 1\), expected \(n_envs, features, actions\)"),
    hostile_case("sde", "noise", value=lambda t: t[:, :3], id="sde-features",
                 message=r"does not fit this env: sde\['noise'\] is a torch.float32 tensor of shape \(2, 3, 1\)"),
    hostile_case("sde", "step", value=-1, id="sde-step", message=r"sde\['step'\] must be an int >= 0"),
]


@pytest.mark.parametrize("path, value, message", HOSTILE + HOSTILE_SDE)
def test_a_hostile_checkpoint_is_refused_naming_the_file_and_the_field(hostile, hostile_sde, tmp_path, path, value,
                                                                       message):
    state = checkpoint.read(hostile_sde if "sde" in path or "use_sde" in path else hostile)
    if path[0] == "rank_states":
        state = with_rank_states(state)
    parent = functools.reduce(lambda d, k: d[k], path[:-1], state)
    if value is DROP:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value(parent[path[-1]]) if callable(value) else value
    checkpoint.write_atomic(state, tmp_path / "m.pt")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    expected = f"m.pt {message}" if message.startswith("does not fit") else f"m.pt is damaged \\({message}"
    with pytest.raises(ValueError, match=expected):
        TRPO.load(tmp_path / "m.pt", log_dir=tmp_path / "logs")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


def test_saved_envs_are_checked_against_their_observations(saved, tmp_path):
    state = checkpoint.read(saved)
    state["collector"]["last_obs"] = state["collector"]["last_obs"][:, :3].contiguous()
    checkpoint.write_atomic(state, tmp_path / "m.pt")
    assert TRPO.load(tmp_path / "m.pt").num_timesteps == 64  # fresh envs: the saved observations are not used
    with pytest.raises(ValueError, match=r"m.pt is damaged \(collector: last_obs has shape \(2, 3\), the saved envs' "
                                         r"observations \(2, \(4,\)\)\)"):
        TRPO.load(tmp_path / "m.pt", restore_env_states=True)
