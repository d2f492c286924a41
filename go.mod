module github.com/vhdkit/vhdkit

go 1.26

require (
	github.com/digitalocean/go-qemu v0.0.0-20250212194115-ee9b0668d242
	github.com/rogpeppe/go-internal v1.16.0
	golang.org/x/sys v0.30.0
)

require (
	github.com/digitalocean/go-libvirt v0.0.0-20220804181439-8648fbde413e // indirect
	golang.org/x/tools v0.26.0 // indirect
)
