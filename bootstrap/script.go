package bootstrap

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/hangar-ci/hangar/internal/clock"
	"github.com/hangar-ci/hangar/scripts"
)

// MaxScript bounds a bootstrap script, whatever its source.
const MaxScript = 1 << 20

// Scripts fetches pools' bootstrap scripts from "builtin:NAME", a file path
// or an https URL. Files are read on every call, so an edit takes effect at
// the next boot with no restart; URLs are cached for CacheFor so that a
// hundred booting instances do not mean a hundred fetches.
type Scripts struct {
	HTTP     *http.Client
	CacheFor time.Duration
	Clock    clock.Clock // nil: clock.Real

	mu    sync.Mutex
	cache map[string]cached
}

type cached struct {
	body []byte
	at   time.Time
}

// Load returns the script named by src.
func (s *Scripts) Load(ctx context.Context, src string) ([]byte, error) {
	switch {
	case strings.HasPrefix(src, "builtin:"):
		b, err := scripts.BootstrapScript(strings.TrimPrefix(src, "builtin:"))
		if err != nil {
			return nil, fmt.Errorf("reading bootstrap script %s: no such built-in script", src)
		}
		return b, nil
	case strings.HasPrefix(src, "https://"), strings.HasPrefix(src, "http://"):
		b, err := s.fetch(ctx, src)
		if err != nil {
			return nil, err
		}
		return expanded(src, b, "")
	default:
		b, err := readFile(src)
		if err != nil {
			return nil, fmt.Errorf("reading bootstrap script: %w", err)
		}
		// A file's includes are read at every load too, relative to it.
		return expanded(src, b, filepath.Dir(src))
	}
}

// expanded is scripts.Expand within MaxScript.
func expanded(src string, b []byte, dir string) ([]byte, error) {
	b, err := scripts.Expand(src, b, dir, readFile)
	if err != nil {
		return nil, fmt.Errorf("reading bootstrap script: %w", err)
	}
	if len(b) > MaxScript {
		return nil, fmt.Errorf("bootstrap script %s is over %d bytes with its includes", src, MaxScript)
	}
	return b, nil
}

func readFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer func() { _ = f.Close() }()
	return readLimited(f, path)
}

func (s *Scripts) fetch(ctx context.Context, url string) ([]byte, error) {
	s.mu.Lock()
	c, ok := s.cache[url]
	s.mu.Unlock()
	if ok && s.now().Sub(c.at) < s.CacheFor {
		return c.body, nil
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, fmt.Errorf("fetching bootstrap script %s: %w", url, err)
	}
	client := s.HTTP
	if client == nil {
		client = &http.Client{Timeout: 30 * time.Second}
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("fetching bootstrap script: %w", err)
	}
	defer func() { _ = resp.Body.Close() }()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("fetching bootstrap script %s: %s", url, resp.Status)
	}
	body, err := readLimited(resp.Body, url)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	if s.cache == nil {
		s.cache = map[string]cached{}
	}
	s.cache[url] = cached{body: body, at: s.now()}
	s.mu.Unlock()
	return body, nil
}

func (s *Scripts) now() time.Time {
	if s.Clock == nil {
		return clock.Real.Now()
	}
	return s.Clock.Now()
}

func readLimited(r io.Reader, name string) ([]byte, error) {
	b, err := io.ReadAll(io.LimitReader(r, MaxScript+1))
	if err != nil {
		return nil, fmt.Errorf("reading bootstrap script %s: %w", name, err)
	}
	if len(b) > MaxScript {
		return nil, fmt.Errorf("bootstrap script %s is over %d bytes", name, MaxScript)
	}
	return b, nil
}
