module github.com/vhdkit/vhdkit

go 1.26

require (
	github.com/chromedp/chromedp v0.23.1
	github.com/digitalocean/go-qemu v0.0.0-20250212194115-ee9b0668d242
	github.com/rogpeppe/go-internal v1.16.0
	golang.org/x/sys v0.30.0
)

require (
	github.com/chromedp/cdproto v0.160.1 // indirect
	github.com/digitalocean/go-libvirt v0.0.0-20220804181439-8648fbde413e // indirect
	github.com/go-json-experiment/json v0.0.0-20260213210345-44df1a37e875 // indirect
	golang.org/x/tools v0.26.0 // indirect
)
