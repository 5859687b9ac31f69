"""The artifact store's integrity: code versions, one writer per artifact (OS locks), the
file lists manifests record and their verification, content identities of external inputs."""
