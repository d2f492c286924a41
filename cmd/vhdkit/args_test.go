package main

import (
	"errors"
	"flag"
	"io"
	"slices"
	"strings"
	"testing"
)

func TestParseArgs(t *testing.T) {
	type parsed struct {
		positional []string
		size       string
		json       bool
		name       string
	}
	parse := func(args ...string) (parsed, error) {
		fs := flag.NewFlagSet("test", flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		var p parsed
		var size sizeValue
		fs.Var(&size, "size", "")
		fs.BoolVar(&p.json, "json", false, "")
		fs.StringVar(&p.name, "name", "", "")
		pos, err := parseArgs(fs, args)
		p.positional, p.size = pos, size.String()
		return p, err
	}
	for _, tc := range []struct {
		args []string
		want parsed
	}{
		{nil, parsed{}},
		{[]string{"a", "b"}, parsed{positional: []string{"a", "b"}}},
		{[]string{"--size", "1K", "f"}, parsed{positional: []string{"f"}, size: "1024"}},
		{[]string{"f", "--size", "1K"}, parsed{positional: []string{"f"}, size: "1024"}},
		{[]string{"f", "-size=2K"}, parsed{positional: []string{"f"}, size: "2048"}},
		{[]string{"a", "--json", "b"}, parsed{positional: []string{"a", "b"}, json: true}},
		{[]string{"--json=false", "a"}, parsed{positional: []string{"a"}}},
		{[]string{"a", "--name", "--json"}, parsed{positional: []string{"a"}, name: "--json"}},
		{[]string{"--json", "--", "--size", "-"}, parsed{positional: []string{"--size", "-"}, json: true}},
		{[]string{"-", "a"}, parsed{positional: []string{"-", "a"}}},
	} {
		got, err := parse(tc.args...)
		if err != nil || !slices.Equal(got.positional, tc.want.positional) || got.size != tc.want.size ||
			got.json != tc.want.json || got.name != tc.want.name {
			t.Errorf("parseArgs(%q) = %+v, %v; want %+v", tc.args, got, err, tc.want)
		}
	}

	for _, tc := range []struct {
		args []string
		want string // in the error
	}{
		{[]string{"--bogus"}, "--bogus"},
		{[]string{"f", "--size"}, "flag needs an argument: --size"},
		{[]string{"--size", "1.5G"}, `invalid value "1.5G" for flag --size`},
		{[]string{"--size", "-1", "f"}, `invalid value "-1" for flag --size`},
	} {
		_, err := parse(tc.args...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("parseArgs(%q): error %v, want one containing %q", tc.args, err, tc.want)
		}
	}
	if _, err := parse("f", "--help"); !errors.Is(err, flag.ErrHelp) {
		t.Errorf("parseArgs(--help): %v, want flag.ErrHelp", err)
	}
}
