"""A series retrieve, piece by piece: the streaming multipart reader, the SOP
Instance UID read from a part's first bytes, and SeriesStream's hand-over,
budget and fallbacks. The pipeline against a real Orthanc is in
test_dicomweb.py."""

import glob
import io
import os
import random
import threading

import pydicom
import pytest
from pydicom.data import get_testdata_file

from beam_pipeline.tools import sample
from transforms.contract.errors import FileTooLargeError
from transforms.decode import _native, series
from transforms.io import multipart


def _body(parts, boundary=b'xB0', sized=True, preamble=b'', epilogue=b'\r\n'):
  out = [preamble]
  for data in parts:
    length = b'Content-Length: %d\r\n' % len(data) if sized else b''
    out.append(
      b'--'
      + boundary
      + b'\r\nContent-Type: application/dicom\r\n'
      + length
      + b'\r\n'
      + data
      + b'\r\n'
    )
  return b''.join(out) + b'--' + boundary + b'--' + epilogue


def _reader(data: bytes, step: int | None = None):
  """read(n) over ``data``, giving at most ``step`` bytes a call."""
  stream = io.BytesIO(data)
  return lambda n: stream.read(n if step is None else min(n, step))


def _all(body, choose=lambda headers, head: head[:1].decode(), limit=None, **kw):
  return list(multipart.parts(_reader(body, **kw), b'xB0', choose, limit))


@pytest.mark.parametrize('sized', [True, False])
@pytest.mark.parametrize('step', [None, 1, 7, 4096])
def test_parts_come_whole_in_order_whatever_the_reads_give(sized, step):
  rng = random.Random(5)
  datas = [b'a' + rng.randbytes(n) for n in (0, 1, 100, 70_000, 300_000, 5)] + [
    b'b\r\n--xB0 looks like a delimiter but is not followed by one'
  ]
  if not sized:  # an unsized part ends at the first delimiter: none inside
    datas = [d.replace(b'\r\n--xB0', b'') for d in datas]
  got = _all(_body(datas, sized=sized, preamble=b'ignored\r\n'), step=step)
  assert [p.data for p in got] == datas
  assert [p.size for p in got] == [len(d) for d in datas]


@pytest.mark.parametrize('sized', [True, False])
def test_parts_passed_over_or_over_the_limit_are_not_kept(sized):
  datas = [b'k' + b'1' * 10, b's' + b'2' * 50_000, b'k' + b'3' * 300_000, b'k4']
  body = _body(datas, sized=sized)
  choose = lambda headers, head: None if head[:1] == b's' else len(head)  # noqa: E731
  got = list(multipart.parts(_reader(body, step=999), b'xB0', choose, 1000))
  assert [(p.data, p.size) for p in got] == [
    (datas[0], 11),
    (None, 300_001),
    (datas[3], 2),
  ]
  # choose saw at most HEAD_BYTES of the large part
  assert got[1].key == multipart.HEAD_BYTES


def test_malformed_bodies_raise_instead_of_giving_a_wrong_part():
  whole = _body([b'abc' * 100])
  with pytest.raises(multipart.MultipartError, match='ends in the middle'):
    _all(whole[:150])
  with pytest.raises(multipart.MultipartError, match='Content-Length'):
    _all(whole.replace(b'Content-Length: 300', b'Content-Length: 299'))
  with pytest.raises(multipart.MultipartError, match='no multipart delimiter'):
    _all(b'x' * 200_000)
  with pytest.raises(multipart.MultipartError, match='no end to its headers'):
    _all(b'--xB0\r\nContent-Type: a' + b'a' * 40_000)
  with pytest.raises(multipart.MultipartError, match='not multipart'):
    multipart.boundary_of('application/dicom')
  assert multipart.boundary_of('multipart/related; boundary="a b"') == b'a b'


def _uid_files():
  """pydicom's bundled test files (the folder of one: no download)."""
  folder = os.path.dirname(get_testdata_file('MR_small.dcm'))
  for path in sorted(glob.glob(os.path.join(folder, '*.dcm'))):
    try:
      ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:
      continue
    if 'SOPInstanceUID' in ds:
      yield path, str(ds.SOPInstanceUID)


def test_the_instance_uid_is_the_data_sets_or_none_never_another():
  found = 0
  for path, uid in _uid_files():
    with open(path, 'rb') as f:
      head = f.read(multipart.HEAD_BYTES)
    got = _native.instance_uid(head)
    assert got in (None, uid), path
    found += got == uid
  assert found >= 40
  deflated = get_testdata_file('image_dfl.dcm')
  with open(deflated, 'rb') as f:
    assert (
      _native.instance_uid(f.read(4096)) == pydicom.dcmread(deflated).SOPInstanceUID
    )


def test_a_meta_group_naming_another_instance_does_not_match_it(tmp_path):
  path = sample.make_tree(str(tmp_path), patients=1, slices=1, rows=4, columns=4)
  (dicom,) = tmp_path.glob('dicoms/*/*.dcm')
  ds = pydicom.dcmread(dicom)
  ds.file_meta.MediaStorageSOPInstanceUID = '1.2.3.4'
  buffer = io.BytesIO()
  ds.save_as(buffer)
  assert path is not None
  assert _native.instance_uid(buffer.getvalue()) == ds.SOPInstanceUID != '1.2.3.4'
  assert _native.instance_uid(buffer.getvalue()[:200]) is None  # cut short


def _instance_bytes(tmp_path, count):
  """{uid: file bytes} of ``count`` generated slices."""
  sample.make_tree(str(tmp_path), patients=1, slices=count, rows=8, columns=8)
  found = {}
  for path in sorted(tmp_path.glob('dicoms/*/*.dcm')):
    data = path.read_bytes()
    found[_native.instance_uid(data)] = data
  assert len(found) == count
  return found


def _stream(files, order, budget=10**9, fail_after=None, limit=None, slots=4):
  body = _body([files[u] for u in order])
  if fail_after is not None:
    body = body[:fail_after]
  ends = []
  kind = 'multipart/related; type="application/dicom"; boundary=xB0'
  stream = series.SeriesStream(
    lambda: (_reader(body, step=3000), kind, lambda: None),
    list(files),
    limit,
    series.Budget(budget) if isinstance(budget, int) else budget,
    threading.BoundedSemaphore(slots),
    ends.append,
  )
  return stream, ends


def test_a_stream_hands_over_every_instance_in_the_order_asked(tmp_path):
  files = _instance_bytes(tmp_path, 12)
  order = list(files)
  random.Random(1).shuffle(order)
  stream, ends = _stream(files, order)
  assert [stream.take(uid) for uid in files] == list(files.values())
  assert stream.streamed == 12 and ends == [None]
  stream.close()


def test_what_does_not_fit_the_budget_or_never_comes_is_retrieved_alone(tmp_path):
  files = _instance_bytes(tmp_path, 10)
  size = max(len(d) for d in files.values())
  budget = series.Budget(3 * size)
  order = list(reversed(files))  # the first one asked for comes last
  stream, ends = _stream(files, order, budget=budget)
  stream._thread.join(10)
  assert budget.held <= 3 * size
  got = [stream.take(uid) for uid in files]
  kept = [uid for uid, data in zip(files, got, strict=True) if data is not None]
  assert 1 <= len(kept) <= 3  # the rest let go: None, retrieve alone
  assert all(files[uid] == data for uid, data in zip(files, got, strict=True) if data)
  assert budget.held == 0

  # A body cut short: what it brought, then None for the rest, and a reason.
  cut = len(_body([files[u] for u in list(files)[:4]])) + 200
  stream, ends = _stream(files, list(files), fail_after=cut)
  got = [stream.take(uid) for uid in files]
  assert got[:4] == list(files.values())[:4] and got[4:] == [None] * 6
  assert ends and 'ends in the middle' in ends[0]


def test_a_waiting_caller_gets_its_instance_even_past_the_budget(tmp_path):
  files = _instance_bytes(tmp_path, 3)
  first = list(files)[0]
  budget = series.Budget(0)  # nothing may be held but what a caller waits for
  order = list(reversed(files))
  gate = threading.Event()
  kind = 'multipart/related; type="application/dicom"; boundary=xB0'
  body = _body([files[u] for u in order])
  read = _reader(body, step=3000)

  def slow_read(n):
    gate.wait(10)
    return read(n)

  stream = series.SeriesStream(
    lambda: (slow_read, kind, lambda: None),
    list(files),
    None,
    budget,
    threading.BoundedSemaphore(1),
  )
  result = []
  taker = threading.Thread(target=lambda: result.append(stream.take(first)))
  taker.start()
  while first not in stream._waiting:
    pass
  gate.set()
  taker.join(10)
  assert result == [files[first]] and budget.held == 0
  stream.close()


def test_oversized_parts_are_errors_and_close_lets_go(tmp_path):
  files = _instance_bytes(tmp_path, 4)
  budget = series.Budget(10**9)
  stream, _ = _stream(files, list(files), budget=budget, limit=100)
  got = stream.take(list(files)[0])
  assert isinstance(
    got, FileTooLargeError
  ) and 'larger than --max-file-bytes 100' in str(got)
  stream, _ = _stream(files, list(files), budget=budget)
  stream._thread.join(10)
  assert budget.held > 0
  stream.close()
  assert budget.held == 0
