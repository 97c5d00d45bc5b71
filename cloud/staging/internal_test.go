package staging

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"testing"

	"golang.org/x/crypto/ssh"

	"github.com/hangar-ci/hangar/internal/testutil"
)

func TestHostKeyAlgorithms(t *testing.T) {
	priv, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	rsaKey, err := ssh.NewPublicKey(&priv.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	got := hostKeyAlgorithms([]ssh.PublicKey{rsaKey})
	want := []string{ssh.KeyAlgoRSASHA512, ssh.KeyAlgoRSASHA256, ssh.KeyAlgoRSA}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %v, want %v", got, want)
	}
	if got := hostKeyAlgorithms(nil); got != nil {
		t.Errorf("no pinned keys gave %v, want nil (the defaults)", got)
	}
}

func TestPIDFilter(t *testing.T) {
	for _, tc := range []struct {
		name   string
		writes []string
		pid    int
		out    string
	}{
		{"pid then output", []string{"123\nerr\n"}, 123, "err\n"},
		{"pid in pieces", []string{"1", "23", "\nmore"}, 123, "more"},
		{"no pid", []string{"bash: syntax error\n"}, 0, "bash: syntax error\n"},
		{"long first line", []string{"0123456789012345678901234567890123456789"}, 0, "0123456789012345678901234567890123456789"},
		{"unfinished line", []string{"12"}, 0, "12"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out bytes.Buffer
			f := newPIDFilter(&out)
			for _, w := range tc.writes {
				if n, err := f.Write([]byte(w)); n != len(w) || err != nil {
					t.Fatalf("Write = %d, %v", n, err)
				}
			}
			f.flush()
			if f.get() != tc.pid || out.String() != tc.out {
				t.Errorf("pid %d, out %q; want %d, %q", f.get(), out.String(), tc.pid, tc.out)
			}
		})
	}
}

// The staging servers' user-data is a POSIX sh script that must pass
// shellcheck, like every script Hangar hands an instance.
func TestServerUserDataShellcheck(t *testing.T) {
	sc := testutil.NeedTool(t, "shellcheck", "apt-get install shellcheck")
	path := filepath.Join(t.TempDir(), "user-data")
	if err := os.WriteFile(path, []byte(serverUserData), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(sc, "-e", "SC2086", path).CombinedOutput(); err != nil {
		t.Fatalf("shellcheck: %v\n%s", err, out)
	}
}
