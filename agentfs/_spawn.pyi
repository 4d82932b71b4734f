# The face of agentfs/_spawn.c (see its spawn_doc).
def spawn(candidates: list[str], argv: list[str], env: list[str],
          stdio: tuple[int, ...], uid: int, gid: int, tmp_options: str,
          pins: list[tuple[str, str]], tools: list[tuple[str, int, bool]], writable: list[str],
          landlock: tuple[int, int, int, int, int], proxy_port: int,
          limits: list[tuple[int, int]], ignored: list[int], cwd: str,
          join: tuple[int, int]) -> tuple[int, int, int, int, int]: ...
