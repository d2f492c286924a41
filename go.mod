module github.com/vhdkit/vhdkit

go 1.26
