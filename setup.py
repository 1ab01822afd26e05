"""Installs the pipeline's packages; also how remote workers get them (--setup_file)."""

import setuptools

setuptools.setup(
  name='cardiac-mri-beam',
  version='0.2.0',
  description='Cardiac-MRI DICOM and contour trees to a Parquet dataset, '
  'with Apache Beam.',
  # Every package under the two top-level ones, so a new subpackage ships too.
  packages=setuptools.find_packages(include=['beam_pipeline*', 'transforms*']),
  package_data={'beam_pipeline': ['py.typed'], 'transforms': ['py.typed']},
  python_requires='>=3.10',
  entry_points={'console_scripts': ['cardiac-mri = beam_pipeline.launch.cli:command']},
  install_requires=[
    'apache-beam>=2.77,<3',
    'pydicom>=3.0,<4',
    'numpy>=1.26,<3',
    'pyarrow>=17,<26',
    'pillow>=10,<13',
    'shapely>=2.0,<3',
    'xxhash>=3.4,<4',
    'pylibjpeg>=2.0',
    'pylibjpeg-libjpeg>=2.1',
    'pylibjpeg-openjpeg>=2.3',
    'tqdm>=4.66,<5',
    'urllib3>=2,<3',
    'obstore>=0.12.1,<0.13',
    'deltalake>=1.6.6,<2',
  ],
  extras_require={
    # The training hand-off's companions (docs/TRAINING.md). Install torch's
    # CPU wheel first (pip install torch --index-url
    # https://download.pytorch.org/whl/cpu), or pip picks a CUDA build.
    'train': [
      'torch>=2.2',
      'monai>=1.4',
      'nibabel>=5.2',
      'pandas>=2.1,<4',
      'duckdb>=1.1,<3',
      'polars>=1.0,<3',
    ],
  },
)
