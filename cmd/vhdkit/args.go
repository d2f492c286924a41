package main

import (
	"errors"
	"flag"
	"regexp"
	"strings"
)

// parseArgs parses args with fs but, unlike fs.Parse, lets flags come
// before, after or between the positional arguments, so that
// "vhdkit create d.vhdx --size 1G" works. Flags take one or two dashes and
// their value either as "--name=value" or as the next argument; "--" ends
// the flags. It returns the positional arguments in order.
func parseArgs(fs *flag.FlagSet, args []string) ([]string, error) {
	var flags, positional []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			positional = append(positional, args[i+1:]...)
			break
		}
		if len(a) < 2 || a[0] != '-' {
			positional = append(positional, a)
			continue
		}
		flags = append(flags, a)
		name := strings.TrimPrefix(strings.TrimPrefix(a, "-"), "-")
		if strings.Contains(name, "=") {
			continue
		}
		f := fs.Lookup(name)
		if f == nil || isBoolFlag(f) {
			continue // fs.Parse reports unknown flags; bool flags take no value
		}
		if i+1 < len(args) {
			i++
			flags = append(flags, args[i])
		}
	}
	if err := fs.Parse(flags); err != nil {
		if err == flag.ErrHelp {
			return nil, err
		}
		// The flag package names flags with one dash; vhdkit documents two.
		return nil, errors.New(singleDashFlag.ReplaceAllString(err.Error(), "$1--$2"))
	}
	return positional, nil
}

// singleDashFlag matches a flag name as the flag package's errors print it.
var singleDashFlag = regexp.MustCompile(`(^|[ :])-([A-Za-z])`)

func isBoolFlag(f *flag.Flag) bool {
	b, ok := f.Value.(interface{ IsBoolFlag() bool })
	return ok && b.IsBoolFlag()
}
