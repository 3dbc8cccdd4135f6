"""The RVQ embedding op: reference vs the Code2Wav/talker sums, Triton vs reference, bad input, compile trace."""

import pytest
import torch

import omni_fast
from omni_fast.reference import rvq as ref_rvq
from omni_fast.testing import DEVICE, KERNEL_DTYPES, assert_matches_reference, interpreter_loads

transformers = pytest.importorskip("transformers")


# --- RVQ embedding ------------------------------------------------------------------------------------------------


def test_rvq_reference_matches_code2wav_and_talker_sum():
    g = torch.Generator().manual_seed(0)
    G, V, D = 4, 11, 8
    emb = torch.nn.Embedding(G * V, D)
    offset = (torch.arange(G) * V).view(1, G, 1)
    codes = torch.randint(0, V, (2, G, 5), generator=g)  # Code2Wav layout [B, G, T]
    want = emb(codes + offset).mean(1)  # Qwen3OmniMoeCode2Wav: code_embedding(codes + code_offset).mean(1)
    got = ref_rvq.rvq_embed(codes.transpose(1, 2), emb.weight, reduce="mean", offsets=offset.flatten())
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    tables = [torch.randn(v, D, dtype=torch.bfloat16, generator=g) for v in (13, 11, 11, 11)]
    c = torch.stack([torch.randint(0, t.shape[0], (6,), generator=g) for t in tables], -1)
    want = torch.cat([tables[i][c[:, i:i + 1]] for i in range(4)], 1).sum(1)  # the Talker's codec_hiddens.sum(1)
    torch.testing.assert_close(ref_rvq.rvq_embed(c, tables), want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("N,G,D", [(0, 3, 16), (1, 1, 8), (7, 16, 40), (5, 4, 1100)])
def test_rvq_triton_matches_reference(dtype, N, G, D):
    g = torch.Generator().manual_seed(N + G)
    tables = [torch.randn(5 + i, D, generator=g).to(DEVICE, dtype) for i in range(G)]
    codes = torch.stack([torch.randint(0, 5 + i, (N, 2), generator=g) for i in range(G)], -1).to(DEVICE)
    big = torch.randn(9 * G, D, generator=g).to(DEVICE, dtype)
    offs = torch.arange(G) * 9
    bcodes = torch.randint(0, 9, (N, G), generator=g).to(DEVICE).int()
    for got, args, kw in [
        (omni_fast.ops.rvq_embed(codes, tables, backend="triton"), (codes, tables), {}),
        (omni_fast.ops.rvq_embed(bcodes, big, offsets=offs, reduce="mean", backend="triton"), (bcodes, big),
         dict(offsets=offs, reduce="mean")),
    ]:
        exact = ref_rvq.rvq_embed(args[0], [t.double() for t in args[1]] if isinstance(args[1], list)
                                  else args[1].double(), **kw)
        same = ref_rvq.rvq_embed(*args, **kw)
        assert_matches_reference(got, exact, same)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("B,G,T,D", [(1, 16, 1, 32), (2, 16, 4, 40), (3, 5, 7, 1100), (2, 16, 0, 8)])
def test_rvq_code2wav_layout_triton_matches_embed_codes(dtype, B, G, T, D):
    """Code2Wav's embedding as the stream runs it: ``[B, G, T]`` codes read through a transposed view (no copy),
    one table with int64 ``[G]`` (or int32, or strided) row offsets, the mean; equals
    ``reference.code2wav.embed_codes`` within the dtype's rounding, and exactly in fp32 with G = 16, D = 32."""
    from omni_fast.reference import code2wav as ref_c2w

    g = torch.Generator().manual_seed(B * 100 + T)
    V = 11
    cfg = ref_c2w.Code2WavConfig(codebook_size=V, num_quantizers=G, hidden_size=D)
    table = torch.randn(G * V, D, generator=g).to(DEVICE, dtype)
    codes = torch.randint(0, V, (B, G, T), generator=g).to(DEVICE)
    offsets = ref_c2w.codebook_offsets(cfg, DEVICE).view(-1)
    want = ref_c2w.embed_codes(cfg, table, codes)
    exact = ref_c2w.embed_codes(cfg, table.double(), codes)
    for offs in (offsets, offsets.int(), torch.stack((offsets, offsets), -1)[:, 0]):  # (the last one strided)
        got = omni_fast.ops.rvq_embed(codes.transpose(1, 2), table, reduce="mean", offsets=offs,
                                      check_values=False, backend="triton")
        assert got.shape == (B, T, D)
        assert_matches_reference(got, exact, want)
        if dtype == torch.float32 and G == 16 and D == 32:  # fp32 sum in group order, then the exact /16
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("call,err,match", [
    (lambda t, c: omni_fast.ops.rvq_embed(c + 100, t), ValueError, "codes"),
    (lambda t, c: omni_fast.ops.rvq_embed(c - 100, t), ValueError, "codes"),
    (lambda t, c: omni_fast.ops.rvq_embed(c[:, :2], t), ValueError, "codebooks"),
    (lambda t, c: omni_fast.ops.rvq_embed(c.float(), t), TypeError, "codes"),
    (lambda t, c: omni_fast.ops.rvq_embed(c, t, reduce="max"), ValueError, "reduce"),
    (lambda t, c: omni_fast.ops.rvq_embed(c, torch.cat(t), offsets=[0, 5]), ValueError, "offsets"),
    (lambda t, c: omni_fast.ops.rvq_embed(c, torch.cat(t), offsets=[0, 5, 100]), ValueError, "offsets"),
    (lambda t, c: omni_fast.ops.rvq_embed(c, t, offsets=[0, 5, 10]), ValueError, "offsets"),
    (lambda t, c: omni_fast.ops.rvq_embed(c, [t[0], t[1], torch.randn(5, 3)]), ValueError, "tables"),
    (lambda t, c: omni_fast.ops.rvq_embed(c, [t[0], t[1], t[2].half()]), TypeError, "tables"),
])
def test_rvq_bad_input(call, err, match):
    tables = [torch.randn(5, 4) for _ in range(3)]
    codes = torch.randint(0, 5, (2, 3))
    with pytest.raises(err, match=match):
        call(tables, codes)


def test_rvq_unchecked_bad_codes_add_nothing():
    """With the value check off (as on CUDA by default: no host sync), an out-of-range code adds nothing in the
    Triton kernel instead of reading outside its table (list of tables, and one table with offsets)."""
    g = torch.Generator().manual_seed(3)
    tables = [torch.randn(5, 8, generator=g).to(DEVICE) for _ in range(3)]
    codes = torch.tensor([[1, 5, 2], [-1, 0, 4], [0, 1, 2]], device=DEVICE)  # 5 and -1 are out of range
    got = omni_fast.ops.rvq_embed(codes, tables, check_values=False, backend="triton")
    want = torch.stack([tables[0][1] + tables[2][2], tables[1][0] + tables[2][4],
                        tables[0][0] + tables[1][1] + tables[2][2]])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    big, offs = torch.cat(tables), torch.tensor([0, 5, 10], device=DEVICE)
    got = omni_fast.ops.rvq_embed(torch.tensor([[1, 2, 5]], device=DEVICE), big, offsets=offs, check_values=False,
                                  backend="triton")  # 5 + offset 10 = row 15: past the table's 15 rows
    torch.testing.assert_close(got, (tables[0][1] + tables[1][2])[None], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_rvq_unchecked_bad_offsets_add_nothing(backend):
    """Unchecked offsets (as on CUDA by default): a group whose first row ``offsets[g]`` lies outside the one table
    (at or past its end, or negative) adds nothing, as a code past the table's end does; both backends agree (the
    Triton kernel clamped such a first row into the table, so an offset past the end added the table's last row;
    the reference raised IndexError)."""
    g = torch.Generator().manual_seed(5)
    big = torch.randn(15, 16, generator=g).to(DEVICE)
    codes = torch.tensor([[1, 2, 0], [0, 2, 1], [3, 2, 1]], device=DEVICE)
    for offs, want in (([0, 5, 15], [big[1] + big[7], big[0] + big[7], big[3] + big[7]]),
                       ([-1, 5, 10], [big[7] + big[10], big[7] + big[11], big[7] + big[11]]),
                       ([0, 40, 10], [big[1] + big[10], big[0] + big[11], big[3] + big[11]])):
        with interpreter_loads() as loads:
            got = omni_fast.ops.rvq_embed(codes, big, offsets=torch.tensor(offs, device=DEVICE),
                                          check_values=False, backend=backend)
        torch.testing.assert_close(got, torch.stack(want), rtol=1e-6, atol=1e-6, msg=f"offsets {offs}")
        if backend == "triton" and DEVICE.type == "cpu":
            assert not loads.outside([big]), loads.outside([big])


@pytest.mark.skipif(DEVICE.type != "cpu", reason="records the interpreter's load addresses")
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_rvq_gathers_stay_in_their_tables_whatever_the_codes(dtype):
    """rvq_tile's clamp: any code value (negative, the table's row count, 2^31 - 1, near the int64 ends, whose
    unclamped row offset would wrap) forms only addresses inside the tables, masked-off lanes included; the masked
    rule still holds (a bad code adds nothing, as in the reference backend). The persistent frame's drain relies on
    it: tests/test_persistent_watchdog.py."""
    g = torch.Generator().manual_seed(4)
    tables = [torch.randn(v, 16, generator=g) for v in (5, 7, 6)]  # D = the kernel's BLOCK_D: no masked tail lanes
    info = torch.iinfo(dtype)
    poison = [-5, -1, 5, 7, 6, info.max, info.min, info.max // 3]
    codes = torch.tensor([[p, 3, 2] for p in poison] + [[1, p, p] for p in poison], dtype=dtype)
    big, offs = torch.cat(tables), torch.tensor([0, 5, 12])
    for tabs, kw in ((tables, {}), (big, dict(offsets=offs))):
        with interpreter_loads() as loads:
            got = omni_fast.ops.rvq_embed(codes, tabs, check_values=False, backend="triton", **kw)
        assert loads.loads and not loads.outside(tables if isinstance(tabs, list) else [big]), \
            loads.outside(tables if isinstance(tabs, list) else [big])
        want = omni_fast.ops.rvq_embed(codes, tabs, check_values=False, backend="reference", **kw)
        assert torch.equal(got, want)


def test_rvq_compile_traces():
    tables = torch.randn(12, 4)
    offs = torch.tensor([0, 4, 8])
    codes = torch.randint(0, 4, (3, 3))
    fn = torch.compile(lambda c: omni_fast.ops.rvq_embed(c, tables, offsets=offs, backend="reference"),
                       fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(codes), ref_rvq.rvq_embed(codes, tables, offsets=offs))


