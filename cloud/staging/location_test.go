package staging_test

import (
	"reflect"
	"testing"

	"golang.org/x/crypto/ssh"

	"github.com/hangar-ci/hangar/cloud/staging"
)

func TestParseLocations(t *testing.T) {
	tests := []struct {
		args []string
		want []staging.Location
		bad  bool
	}{
		{args: []string{"/src/", "vol:data:/dst"}, want: []staging.Location{{Kind: "local", Path: "/src/"}, {Kind: "vol", Name: "data", Path: "/dst"}}},
		{args: []string{"vol:data", "out"}, want: []staging.Location{{Kind: "vol", Name: "data", Path: "/"}, {Kind: "local", Path: "out"}}},
		{args: []string{"vol:data:rel/x/", "."}, want: []staging.Location{{Kind: "vol", Name: "data", Path: "/rel/x/"}, {Kind: "local", Path: "."}}},
		{args: []string{"vol:a:/x", ":/y", "server:s1:/opt"}, want: []staging.Location{{Kind: "vol", Name: "a", Path: "/x"}, {Kind: "vol", Name: "a", Path: "/y"}, {Kind: "server", Name: "s1", Path: "/opt"}}},
		{args: []string{"fred@gw.example.org:music", "./a:b"}, want: []staging.Location{{Kind: "host", Name: "fred@gw.example.org", Path: "music"}, {Kind: "local", Path: "./a:b"}}},
		{args: []string{"server:i-0123abcd:/etc", "x"}, want: []staging.Location{{Kind: "server", Name: "i-0123abcd", Path: "/etc"}, {Kind: "local", Path: "x"}}},
		{args: []string{"vol:data:/../../etc/shadow", "x"}, bad: true},
		{args: []string{"vol:data:a/../..", "x"}, bad: true},
		{args: []string{"vol:data:/a..b/", "x"}, want: []staging.Location{{Kind: "vol", Name: "data", Path: "/a..b/"}, {Kind: "local", Path: "x"}}},
		{args: []string{":/y", "x"}, bad: true},
		{args: []string{"/a", ":/y"}, bad: true},
		{args: []string{"vol:Bad Name:/x", "y"}, bad: true},
		{args: []string{"server:s1", "y"}, bad: true},
		{args: []string{"-oProxyCommand=x:/p", "y"}, bad: true},
		{args: []string{"a$(id):/p", "y"}, bad: true},
		{args: []string{"", "y"}, bad: true},
	}
	for _, tt := range tests {
		got, err := staging.ParseLocations(tt.args)
		if tt.bad {
			if err == nil {
				t.Errorf("ParseLocations(%q) = %+v, want an error", tt.args, got)
			}
			continue
		}
		if err != nil || !reflect.DeepEqual(got, tt.want) {
			t.Errorf("ParseLocations(%q) = %+v, %v; want %+v", tt.args, got, err, tt.want)
		}
	}
}

func TestConsoleHostKeys(t *testing.T) {
	const key1 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
	const key2 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB8Hp1i2Ek8e0KVW1F/7zf2u6xH+w6wQ2pE0P1WD5UBy"
	tests := []struct {
		name    string
		console string
		want    []string
		bad     bool
	}{
		{name: "none yet", console: "booting\n"},
		{name: "one block", console: "x\n-----BEGIN SSH HOST KEY KEYS-----\r\n" + key1 + " root@h\r\n-----END SSH HOST KEY KEYS-----\r\nmore\n", want: []string{key1}},
		{name: "last complete block wins", console: "-----BEGIN SSH HOST KEY KEYS-----\n" + key1 + "\n-----END SSH HOST KEY KEYS-----\n-----BEGIN SSH HOST KEY KEYS-----\n" + key2 + "\n-----END SSH HOST KEY KEYS-----\n-----BEGIN SSH HOST KEY KEYS-----\n" + key1, want: []string{key2}},
		{name: "garbage in block", console: "-----BEGIN SSH HOST KEY KEYS-----\nnot a key\n-----END SSH HOST KEY KEYS-----\n", bad: true},
	}
	for _, tt := range tests {
		keys, err := staging.ConsoleHostKeys([]byte(tt.console))
		if tt.bad != (err != nil) {
			t.Errorf("%s: err = %v", tt.name, err)
			continue
		}
		var got []string
		for _, k := range keys {
			got = append(got, string(k.Marshal()))
		}
		var want []string
		for _, w := range tt.want {
			k, _, _, _, err := ssh.ParseAuthorizedKey([]byte(w))
			if err != nil {
				t.Fatal(err)
			}
			want = append(want, string(k.Marshal()))
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%s: got %q, want %q", tt.name, got, want)
		}
	}
}
