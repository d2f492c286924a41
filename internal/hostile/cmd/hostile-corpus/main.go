// Command hostile-corpus writes the hostile image corpus (package
// internal/hostile) into a folder and lists its cases, one a line:
// class/name, the image's path, the folder its locators lead out to, and
// what is wrong with it.
//
//	go run ./internal/hostile/cmd/hostile-corpus [-dense] DIR
package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/vhdkit/vhdkit/internal/hostile"
)

func main() {
	dense := flag.Bool("dense", false, "also cut the seeds every 4 KiB")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: hostile-corpus [-dense] DIR")
		os.Exit(2)
	}
	cases, err := hostile.Generate(flag.Arg(0), hostile.Options{Dense: *dense})
	if err != nil {
		fmt.Fprintln(os.Stderr, "hostile-corpus:", err)
		os.Exit(1)
	}
	for _, c := range cases {
		fmt.Printf("%s\t%s\t%s\t%s\n", c.ID(), c.Image, c.Outside, c.Note)
	}
}
