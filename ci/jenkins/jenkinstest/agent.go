package jenkinstest

import (
	"archive/zip"
	"bytes"
	_ "embed"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"

	"github.com/hangar-ci/hangar/internal/testutil"
)

// fakeAgentSource is the stand-in for agent.jar; see its comment.
//
//go:embed agent/FakeAgent.java
var fakeAgentSource []byte

var (
	jarOnce sync.Once
	jarData []byte
	jarErr  string
)

// AgentJar returns a jar that `java -jar` runs as a fake inbound agent
// (agent/FakeAgent.java), compiled once per test binary. It skips the test
// when there is no JDK: Debian's default-jdk-headless has java and javac.
func AgentJar(tb testing.TB) []byte {
	tb.Helper()
	testutil.NeedTools(tb, "the fake Jenkins agent needs a JDK (Debian: default-jdk-headless)", "java", "javac")
	jarOnce.Do(func() {
		dir := tb.TempDir()
		src := filepath.Join(dir, "FakeAgent.java")
		if err := os.WriteFile(src, fakeAgentSource, 0o600); err != nil {
			jarErr = err.Error()
			return
		}
		classes := filepath.Join(dir, "classes")
		out, err := exec.Command("javac", "-d", classes, src).CombinedOutput()
		if err != nil {
			jarErr = "javac: " + err.Error() + "\n" + string(out)
			return
		}
		jarData, err = buildJar(classes)
		if err != nil {
			jarErr = err.Error()
		}
	})
	if jarErr != "" {
		tb.Fatalf("building the fake agent.jar: %s", jarErr)
	}
	return jarData
}

// buildJar zips the classes under dir with a manifest naming FakeAgent as
// the main class.
func buildJar(dir string) ([]byte, error) {
	var buf bytes.Buffer
	z := zip.NewWriter(&buf)
	m, err := z.Create("META-INF/MANIFEST.MF")
	if err != nil {
		return nil, err
	}
	if _, err := m.Write([]byte("Manifest-Version: 1.0\r\nMain-Class: FakeAgent\r\n\r\n")); err != nil {
		return nil, err
	}
	err = filepath.WalkDir(dir, func(path string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, err := filepath.Rel(dir, path)
		if err != nil {
			return err
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		f, err := z.Create(filepath.ToSlash(rel))
		if err != nil {
			return err
		}
		_, err = f.Write(b)
		return err
	})
	if err != nil {
		return nil, err
	}
	if err := z.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}
