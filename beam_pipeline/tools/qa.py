"""Visual QA: an index.html with every patient's labelled slices, their mask
outlines and quality flags, and a full-size overlay of each.

    cardiac-mri qa OUT QA_DIR        (or: python -m beam_pipeline.tools.qa OUT QA_DIR)

(or ``--qa-dir QA_DIR`` on the pipeline, which runs this after the job).
QA_DIR gets:

- ``index.html``: a legend (the outline colours and what each raised flag
  means), one row per patient (split, slices, labelled slices, flags), a
  table of every flagged slice linking to its overlay, and per patient a grid
  of tiles whose captions name the slice and its flags;
- ``slices/<patient_id>/<slice_index>.png``: the full-size overlay of every
  labelled or flagged slice (inner outline red, outer cyan), scaled up by a
  whole factor when the image is smaller than 256 pixels;
- ``<patient_id>.png``: the patient's contact sheet, one image to share.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import html
import os
import sys

import pyarrow.compute as pc

from beam_pipeline import dataset
from beam_pipeline.tools import pipe, render
from transforms.contract import layout, local_files
from transforms.contract.errors import UsageError
from transforms.contract.flags import FLAGS

INDEX = 'index.html'
OVERLAYS = 'slices'
MIN_OVERLAY_SIDE = 256  # smaller images are scaled up by a whole factor
TILE = 160  # CSS pixels of a tile's image


def _patients(output: str, version: int | None = None) -> dict[str, dict]:
  """Per patient: split, slice count, labelled count, flag counts, flagged slices."""
  table = dataset.open_dataset(output, version).to_table(
    columns=['patient_id', 'split', 'slice_index', 'qa_flags'],
  )
  labeled = dataset.open_dataset(output, version).to_table(
    columns=['patient_id'],
    filter=pc.field('i_mask').is_valid() | pc.field('o_mask').is_valid(),
  )
  labeled_counts = collections.Counter(labeled['patient_id'].to_pylist())
  patients: dict[str, dict] = {}
  for row in table.to_pylist():
    info = patients.setdefault(
      row['patient_id'],
      {
        'split': row['split'],
        'slices': 0,
        'labeled': labeled_counts[row['patient_id']],
        'flags': collections.Counter(),
        'flagged': [],
      },
    )
    info['slices'] += 1
    info['flags'].update(row['qa_flags'])
    if row['qa_flags']:
      info['flagged'].append((row['slice_index'], row['qa_flags']))
  return dict(sorted(patients.items()))


def _safe(patient_id: str) -> str:
  # patient_ids come from link.csv and passed layout.id_problem; check again
  # before one names a file.
  if layout.id_problem(patient_id):
    raise ValueError(f'unsafe patient_id {patient_id!r}')
  return patient_id


def _sheet_name(patient_id: str) -> str:
  return f'{_safe(patient_id)}.png'


def overlay_path(patient_id: str, slice_index: int) -> str:
  """The overlay's path relative to QA_DIR."""
  return f'{OVERLAYS}/{_safe(patient_id)}/{int(slice_index)}.png'


def _scale(row: dict) -> int:
  side = min(row['rows'], row['columns'])
  return max(1, -(-MIN_OVERLAY_SIDE // side)) if side else 1


_STYLE = """
body { font: 16px/1.45 system-ui, sans-serif; color: #111; background: #fff;
  margin: 1.5em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.6em; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
td, th { border: 1px solid #999; padding: 0.3em 0.7em; text-align: left;
  vertical-align: top; }
.legend { border: 1px solid #999; padding: 0.6em 1em; margin-bottom: 1.5em;
  max-width: 62em; }
.legend p { margin: 0.3em 0; }
.legend h2 { margin-top: 0.2em; }
.swatch { display: inline-block; width: 1.1em; height: 1.1em;
  vertical-align: -0.15em; margin-right: 0.4em; border: 1px solid #333; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; width: 170px; padding: 4px; border: 2px solid #ccc;
  background: #f4f4f4; }
figure.flagged { border-color: #c00; }
figure img { display: block; width: 160px; height: auto;
  image-rendering: pixelated; background: #000; }
figcaption { font-size: 14px; overflow-wrap: anywhere; }
.flag { display: block; color: #a00; font-family: ui-monospace, monospace;
  font-size: 13px; }
code { font-size: 14px; }
"""


def _legend(patients: dict[str, dict]) -> str:
  e = html.escape
  raised = sorted({flag for info in patients.values() for flag in info['flags']})
  colours = [
    (render.INNER_COLOUR, 'inner contour (blood pool): i_mask outline'),
    (render.OUTER_COLOUR, 'outer contour (myocardium): o_mask outline'),
  ]
  lines = [
    f'<p><span class="swatch" style="background: rgb{colour}"></span>{e(text)}</p>'
    for colour, text in colours
  ]
  lines.append(
    "<p>Outlines are the masks' own edge pixels: what training sees. A red "
    'frame marks a slice with quality flags; click a tile or a flagged slice '
    'for its full-size overlay.</p>'
  )
  if raised:
    items = ''.join(
      f'<tr><td><code>{e(flag)}</code></td><td>{e(FLAGS.get(flag, ""))}</td></tr>'
      for flag in raised
    )
    lines.append(
      '<table><thead><tr><th>flag raised here</th><th>meaning</th></tr></thead>'
      f'<tbody>{items}</tbody></table>'
    )
  return (
    f'<section class="legend" id="legend"><h2>Legend</h2>{"".join(lines)}</section>'
  )


def _tile(pid: str, slice_index: int, flags: list[str]) -> str:
  e = html.escape
  path = e(overlay_path(pid, slice_index))
  names = ''.join(f'<span class="flag">{e(f)}</span>' for f in flags)
  return (
    f'<figure class="{"flagged" if flags else "tile"}" '
    f'data-flags="{e(" ".join(flags))}"><a href="{path}">'
    f'<img src="{path}" alt="slice {slice_index} of {e(pid)}" loading="lazy"></a>'
    f'<figcaption>slice {slice_index}{names}</figcaption></figure>'
  )


def _index_html(patients: dict[str, dict], tiles: dict[str, list]) -> str:
  e = html.escape
  rows, flagged = [], []
  for pid, info in patients.items():
    flags = ', '.join(f'{e(k)}: {n}' for k, n in sorted(info['flags'].items()))
    name = f'<a href="#{e(pid)}">{e(pid)}</a>' if tiles.get(pid) else e(pid)
    rows.append(
      f'<tr><td>{name}</td>'
      f'<td>{e(info["split"])}</td><td>{info["slices"]}</td>'
      f'<td>{info["labeled"]}</td><td>{flags or "none"}</td></tr>'
    )
    flagged += [
      f'<tr><td>{e(pid)}</td><td><a href="{e(overlay_path(pid, k))}">slice {k}</a>'
      f'</td><td>{e(", ".join(f))}</td></tr>'
      for k, f in sorted(info['flagged'])
    ]
  sections = ''.join(
    f'<h2 id="{e(pid)}">{e(pid)}</h2>'
    f'<p><a href="{e(_sheet_name(pid))}">contact sheet</a> (one image)</p>'
    f'<div class="grid">{"".join(_tile(pid, k, f) for k, f in slices)}</div>'
    for pid, slices in tiles.items()
    if slices
  )
  return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Cardiac MRI QA</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{_STYLE}</style></head><body>
<h1>Cardiac MRI dataset QA</h1>
<p>{len(patients)} patients.</p>
{_legend(patients)}
<table><thead><tr><th>patient</th><th>split</th><th>slices</th>
<th>labeled</th><th>quality flags</th></tr></thead>
<tbody>{''.join(rows)}</tbody></table>
<h2>Flagged slices</h2>
<table id="flagged"><thead><tr><th>patient</th><th>slice (full-size overlay)</th>
<th>flags</th></tr></thead>
<tbody>{''.join(flagged) or '<tr><td colspan="3">none</td></tr>'}</tbody></table>
{sections}
</body></html>
"""


def check_qa_dir(qa_dir: str) -> None:
  """Raises UsageError if ``qa_dir`` is not a folder, or holds, where the QA
  page makes folders (``slices/`` and one per patient in it), a link or
  anything else that is not a folder: planted in a shared folder, it would
  have the overlays written where it leads. (A link or a FIFO planted where
  a file goes is replaced, never followed: ``write_qa``.)"""
  if os.path.lexists(qa_dir) and not os.path.isdir(qa_dir):
    raise UsageError(f'--qa-dir {qa_dir} is not a folder')
  overlays = os.path.join(qa_dir, OVERLAYS)
  folders = [overlays]
  if os.path.isdir(overlays) and not os.path.islink(overlays):
    folders += sorted(entry.path for entry in os.scandir(overlays))
  for path in folders:
    try:
      what = local_files.kind(os.lstat(path))
    except FileNotFoundError:
      continue
    if what != 'a folder':
      raise UsageError(
        f'--qa-dir {qa_dir}: {path} is {what}, not a folder this pipeline made; '
        'remove it, or choose another --qa-dir'
      )


def _save(folder: local_files.Folder, name: str, picture) -> None:
  """Writes ``picture`` as the PNG ``name`` of ``folder``, whole or not at
  all, never through a link at that name."""
  with folder.writer(name) as f:
    picture.save(f, format='PNG')


def write_qa(output: str, qa_dir: str, version: int | None = None) -> str:
  """Writes index.html, the overlays of labelled and flagged slices, and one
  contact sheet per patient with labelled slices.

  Reads one patient's labelled or flagged slices at a time, so memory stays
  bounded. Every file is written under a fresh name and renamed into place,
  and every folder below ``qa_dir`` opened without following a link
  (``local_files.Folder``): a link, FIFO or hard link planted in a shared
  QA folder is replaced, never written through.

  Returns:
    The path of index.html.

  Raises:
    local_files.PlantedError: a link or a file where a folder goes.
  """
  os.makedirs(qa_dir, exist_ok=True)
  if version is None:
    version = dataset.latest_version(output)
  patients = _patients(output, version)
  ds = dataset.open_dataset(output, version)
  labeled = pc.field('i_mask').is_valid() | pc.field('o_mask').is_valid()
  flagged = pc.list_value_length(pc.field('qa_flags')) > 0
  tiles: dict[str, list] = {}
  with contextlib.ExitStack() as held:
    top = held.enter_context(local_files.Folder.open(qa_dir))
    overlays = None
    for pid, info in patients.items():
      if not info['labeled'] and not info['flagged']:
        continue
      rows = ds.to_table(filter=(pc.field('patient_id') == pid) & (labeled | flagged))
      rows = sorted(rows.to_pylist(), key=lambda r: r['slice_index'])
      if overlays is None:
        overlays = held.enter_context(top.folder(OVERLAYS))
      with overlays.folder(_safe(pid)) as folder:
        for row in rows:
          name = overlay_path(pid, row['slice_index']).rsplit('/', 1)[1]
          _save(folder, name, render.overlay(row, _scale(row)))
      tiles[pid] = [(r['slice_index'], list(r['qa_flags'] or [])) for r in rows]
      sheet_rows = [
        r for r in rows if r['i_mask'] is not None or r['o_mask'] is not None
      ]
      _save(top, _sheet_name(pid), render.contact_sheet(sheet_rows or rows))
    top.write(INDEX, _index_html(patients, tiles).encode('utf-8'))
  return os.path.join(qa_dir, INDEX)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('output', help='a pipeline output folder')
  parser.add_argument('qa_dir', help='folder for index.html, overlays and sheets')
  parser.add_argument(
    '--version',
    type=int,
    help='the dataset version to read (default: the latest; see cardiac-mri history)',
  )
  args = parser.parse_args(argv)
  try:
    check_qa_dir(args.qa_dir)
    index = write_qa(args.output, args.qa_dir, args.version)
  except (
    OSError,
    dataset.DatasetError,
    UsageError,
    local_files.PlantedError,
  ) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  pipe.out(f'QA written: {index}')
  return 0


if __name__ == '__main__':
  sys.exit(pipe.run(main))
