"""Visual QA: one contact sheet per patient and an index.html that links them.

    python -m beam_pipeline.qa OUT QA_DIR

(or ``--qa-dir QA_DIR`` on the pipeline, which runs this after the job).
Each sheet shows the patient's labeled slices with their mask outlines (inner
red, outer cyan). index.html has one row per patient (split, slices, labeled
slices, quality flags) and a table of every flagged slice.
"""

from __future__ import annotations

import argparse
import collections
import html
import os
import sys

import pyarrow.compute as pc

from beam_pipeline import dataset, render
from beam_pipeline.contract import layout

INDEX = 'index.html'


def _patients(output: str) -> dict[str, dict]:
  """Per patient: split, slice count, labeled count, flag counts, flagged slices."""
  table = dataset.open_dataset(output).to_table(
    columns=['patient_id', 'split', 'slice_index', 'qa_flags'],
  )
  labeled = dataset.open_dataset(output).to_table(
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


def _sheet_name(patient_id: str) -> str:
  # patient_ids come from link.csv and passed layout.id_problem; check again
  # before one names a file.
  if layout.id_problem(patient_id):
    raise ValueError(f'unsafe patient_id {patient_id!r}')
  return f'{patient_id}.png'


def _patient_link(patient_id: str) -> str:
  return f'<a href="#{html.escape(patient_id)}">{html.escape(patient_id)}</a>'


def _index_html(patients: dict[str, dict]) -> str:
  e = html.escape
  rows, flagged = [], []
  for pid, info in patients.items():
    flags = ', '.join(f'{e(k)}: {n}' for k, n in sorted(info['flags'].items()))
    rows.append(
      f'<tr><td>{_patient_link(pid) if info["labeled"] else e(pid)}</td>'
      f'<td>{e(info["split"])}</td><td>{info["slices"]}</td>'
      f'<td>{info["labeled"]}</td><td>{flags or "none"}</td></tr>'
    )
    flagged += [
      f'<tr><td>{e(pid)}</td><td>{k}</td><td>{e(", ".join(f))}</td></tr>'
      for k, f in sorted(info['flagged'])
    ]
  sheets = ''.join(
    f'<h2 id="{e(pid)}">{e(pid)}</h2>'
    f'<img src="{e(_sheet_name(pid))}" alt="contact sheet of {e(pid)}">'
    for pid, info in patients.items()
    if info['labeled']
  )
  return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Cardiac MRI QA</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
td, th {{ border: 1px solid #999; padding: 0.25em 0.6em; text-align: left; }}
img {{ max-width: 100%; image-rendering: pixelated; }}
</style></head><body>
<h1>Cardiac MRI dataset QA</h1>
<p>{len(patients)} patients. Outlines: inner contour red, outer contour cyan.</p>
<table><thead><tr><th>patient</th><th>split</th><th>slices</th>
<th>labeled</th><th>quality flags</th></tr></thead>
<tbody>{''.join(rows)}</tbody></table>
<h2>Flagged slices</h2>
<table><thead><tr><th>patient</th><th>slice</th><th>flags</th></tr></thead>
<tbody>{''.join(flagged) or '<tr><td colspan="3">none</td></tr>'}</tbody></table>
{sheets}
</body></html>
"""


def write_qa(output: str, qa_dir: str) -> str:
  """Writes one contact sheet per patient with labeled slices, and index.html.

  Reads one patient's labeled slices at a time, so memory stays bounded.

  Returns:
    The path of index.html.
  """
  os.makedirs(qa_dir, exist_ok=True)
  patients = _patients(output)
  ds = dataset.open_dataset(output)
  for pid, info in patients.items():
    if not info['labeled']:
      continue
    rows = ds.to_table(
      filter=(pc.field('patient_id') == pid)
      & (pc.field('i_mask').is_valid() | pc.field('o_mask').is_valid())
    ).to_pylist()
    rows.sort(key=lambda r: r['slice_index'])
    render.contact_sheet(rows).save(os.path.join(qa_dir, _sheet_name(pid)))
  index = os.path.join(qa_dir, INDEX)
  with open(index, 'w', encoding='utf-8') as f:
    f.write(_index_html(patients))
  return index


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('output', help='a pipeline output folder')
  parser.add_argument('qa_dir', help='folder for the sheets and index.html')
  args = parser.parse_args(argv)
  try:
    index = write_qa(args.output, args.qa_dir)
  except FileNotFoundError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'QA written: {index}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
