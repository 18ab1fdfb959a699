# The bundled repositories' tests run inside sandboxes, not in this project's suite.
collect_ignore_glob = ["*"]
