"""Runs gcp-storage-emulator on 127.0.0.1 for tests/test_gcs.py:
`python tests/gcs_emulator.py PORT BUCKET`.

Real GCS answers every object download with its generation (`x-goog-generation`);
the emulator leaves that header out, and tensorstore (Orbax's array writer) needs it for
the conditional writes of its OCDBT manifest. This adds it, and changes nothing else.
"""

import logging
import sys

from gcp_storage_emulator.handlers import objects

_download = objects.download


def download_with_generation(request, response, storage, *args, **kwargs):
  result = _download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
    response['x-goog-generation'] = str(obj['generation'])
    response['x-goog-metageneration'] = str(obj.get('metageneration', 1))
  except Exception:  # pylint: disable=broad-except (a missing object: already a 404)
    pass
  return result


objects.download = download_with_generation  # before the server's routes are built

from gcp_storage_emulator.server import create_server  # noqa: E402

if __name__ == '__main__':
  logging.disable(logging.WARNING)
  port, bucket = int(sys.argv[1]), sys.argv[2]
  create_server('127.0.0.1', port, in_memory=True, default_bucket=bucket).run()
