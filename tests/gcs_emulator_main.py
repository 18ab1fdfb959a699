"""The Cloud Storage emulator of the gs:// tests (tests/conftest.py), run in its own process
(`python tests/gcs_emulator_main.py PORT`; it stops when its stdin closes), with what
gcp-storage-emulator lacks and our clients rely on:

- object generations on reads: real GCS sends `x-goog-generation` with every media download and
  honours `ifGenerationMatch` / `ifGenerationNotMatch` (412 / 304). The emulator did neither, so
  tensorstore's OCDBT, re-reading its manifest after a write with `ifGenerationNotMatch=<gen>`,
  got the whole object back without a generation and failed the checkpoint save with "Malformed
  StorageGeneration" (whenever its manifest cache was re-validated: now and then, depending on
  timing, which is why the failure came and went in CI);
- conditional uploads (`ifGenerationMatch`, 0 = only if absent), which OCDBT's manifest commit
  relies on;
- gcsfs's moveTo rename.
"""

import logging
import sys


def _install_move_to(server_mod, objects) -> None:
    """gcsfs renames with POST .../o/SRC/moveTo/o/DST, which the emulator lacks (a 501 costs ~30 s
    of gcsfs retries before it falls back to copy + delete): emulate it as copy + delete."""

    def move_to(request, response, storage, *a, **kw):
        p = request.params
        try:
            obj = objects._copy(request.base_url, storage, p["bucket_name"], p["object_id"],
                                p["bucket_name"], p["dest_object_id"])
        except objects.NotFound:
            response.status = 404
            return
        objects._delete(storage, p["bucket_name"], p["object_id"])
        response.json(obj)

    route = (r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/"
             r"(?P<dest_object_id>.*[^/]+)$", {"POST": move_to})
    server_mod.HANDLERS = (route,) + tuple(h for h in server_mod.HANDLERS if h[0] != route[0])


def _install_generations(server_mod, objects) -> None:
    from http import HTTPStatus

    def current(request, storage):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except objects.NotFound:
            return None
        return obj

    def precondition(request, response, obj, *, read: bool) -> bool:
        """False (with the status set) when an ifGeneration(Not)Match condition fails."""
        gen = int(obj["generation"]) if obj is not None else 0
        match = request.query.get("ifGenerationMatch")
        if match and int(match[0]) != gen:
            response.status = HTTPStatus.PRECONDITION_FAILED
            return False
        not_match = request.query.get("ifGenerationNotMatch")
        if not_match and int(not_match[0]) == gen and obj is not None:
            response.status = HTTPStatus.NOT_MODIFIED if read else HTTPStatus.PRECONDITION_FAILED
            return False
        return True

    download, insert = objects.download, objects.insert

    def download_with_generation(request, response, storage, *a, **kw):
        obj = current(request, storage)
        if obj is not None:
            if not precondition(request, response, obj, read=True):
                return
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
        download(request, response, storage, *a, **kw)

    def conditional_insert(request, response, storage, *a, **kw):
        name = request.query.get("name")
        if name and (request.query.get("ifGenerationMatch")
                     or request.query.get("ifGenerationNotMatch")):
            request.params["object_id"] = name[0]
            if not precondition(request, response, current(request, storage), read=False):
                return
        insert(request, response, storage, *a, **kw)

    swap = {download: download_with_generation, insert: conditional_insert}
    objects.download = download_with_generation  # objects.get calls it for alt=media
    server_mod.HANDLERS = tuple((regex, {m: swap.get(f, f) for m, f in handlers.items()})
                                for regex, handlers in server_mod.HANDLERS)


def main(port: int) -> None:
    from gcp_storage_emulator import server as server_mod
    from gcp_storage_emulator.handlers import objects

    _install_move_to(server_mod, objects)
    _install_generations(server_mod, objects)
    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
    srv = server_mod.create_server("127.0.0.1", port, in_memory=True, default_bucket="test-bucket")
    srv.start()
    srv._api._httpd.handle_error = lambda *a: None  # clients hanging up early (read-ahead)
    print("ready", flush=True)
    try:
        sys.stdin.read()  # until the test process closes the pipe (or dies)
    finally:
        srv.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]))
