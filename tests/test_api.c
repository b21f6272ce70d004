/* Tests of the public headers (include/): every public function is documented where it is
 * declared, cport.h includes every header, and every error they name has a name. */
/* test-backends: none */
#include "cport.h"
#include "harness.h"

#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

enum { MAX_LINES = 4096, LINE_MAX_LEN = 512 };

static char lines[MAX_LINES][LINE_MAX_LEN];

static int read_lines(const char *path)
{
    FILE *f = fopen(path, "r");
    CHECK(f != NULL);
    int n = 0;
    while (n < MAX_LINES && fgets(lines[n], LINE_MAX_LEN, f)) {
        lines[n][strcspn(lines[n], "\n")] = 0;
        n++;
    }
    CHECK(feof(f)); /* (the file fits) */
    fclose(f);
    return n;
}

static bool starts_with(const char *s, const char *prefix)
{
    return strncmp(s, prefix, strlen(prefix)) == 0;
}

enum { MAX_HEADERS = 32 };

/* The public headers (every .h in include/cport): their file names and full paths.
 * Returns how many. */
static int public_headers(char names[MAX_HEADERS][64], char paths[MAX_HEADERS][PATH_MAX])
{
    const char *root = cpt_source_root();
    CHECK(root != NULL);
    char dir[PATH_MAX - 128];
    snprintf(dir, sizeof dir, "%s/include/cport", root);
    DIR *d = opendir(dir);
    CHECK(d != NULL);
    int n = 0;
    for (struct dirent *e; (e = readdir(d)) != NULL;) {
        size_t len = strlen(e->d_name);
        if (len < 3 || len >= 64 || strcmp(e->d_name + len - 2, ".h") != 0)
            continue;
        CHECK(n < MAX_HEADERS);
        snprintf(names[n], 64, "%s", e->d_name);
        snprintf(paths[n], PATH_MAX, "%s/%s", dir, e->d_name);
        n++;
    }
    closedir(d);
    return n;
}

static char header_names[MAX_HEADERS][64], header_paths[MAX_HEADERS][PATH_MAX];

/* A line that continues the declaration above it (its parameters, indented). */
static bool continues_declaration(const char *l)
{
    const char *t = l + strspn(l, " ");
    return t != l && *t && !starts_with(t, "/*") && !starts_with(t, "*");
}

/* Declarations (CP_EXTERN ...) in the header without a comment right above them, or above
 * the group of declarations they belong to; each is printed. */
static int undocumented_in(const char *path, int *declared)
{
    int n = read_lines(path), missing = 0;
    for (int i = 0; i < n; i++) {
        if (!starts_with(lines[i], "CP_EXTERN"))
            continue;
        (*declared)++;
        int j = i - 1;
        while (j >= 0 && (starts_with(lines[j], "CP_EXTERN") || continues_declaration(lines[j])))
            j--;
        size_t len = j >= 0 ? strlen(lines[j]) : 0;
        if (len < 2 || strcmp(lines[j] + len - 2, "*/") != 0) {
            fprintf(stderr, "%s:%d: undocumented: %s\n", path, i + 1, lines[i]);
            missing++;
        }
    }
    return missing;
}

TEST(every_public_function_is_documented)
{
    int headers = public_headers(header_names, header_paths), declared = 0, missing = 0;
    for (int h = 0; h < headers; h++)
        missing += undocumented_in(header_paths[h], &declared);
    fprintf(stderr, "%d headers, %d public functions, %d undocumented\n", headers, declared,
            missing);
    CHECK(headers >= 7 && declared >= 80);
    CHECK_EQ(missing, 0);
}

/* cport.h, the one header a program needs, includes every public header. */
TEST(cport_h_includes_every_header)
{
    int headers = public_headers(header_names, header_paths), absent = 0;
    char path[PATH_MAX + 32];
    snprintf(path, sizeof path, "%s/include/cport.h", cpt_source_root());
    int n = read_lines(path);
    for (int h = 0; h < headers; h++) {
        char want[96];
        snprintf(want, sizeof want, "#include \"cport/%.63s\"", header_names[h]);
        bool found = false;
        for (int i = 0; i < n && !found; i++)
            found = strcmp(lines[i], want) == 0;
        if (!found) {
            fprintf(stderr, "cport.h lacks %s\n", want);
            absent++;
        }
    }
    CHECK_EQ(absent, 0);
}

/* Every error the public headers say a call returns has a name and a text: cp_err_name()
 * and cp_strerror() ("UNKNOWN", "Unknown error" for values cport does not know) are what
 * a program logs it with. -EDEADLK, which cp_pool_destroy() and cp_server_shutdown()
 * return when called from a callback, was missing: logged as "Unknown error". */
TEST(every_error_the_headers_name_has_a_name)
{
    /* The names cport knows: what cp_err_name() says for each errno value. */
    static char known[256][24];
    for (int e = 1; e < 256; e++)
        snprintf(known[e], sizeof known[e], "%s", cp_err_name(-e));
    int headers = public_headers(header_names, header_paths), named = 0, unknown = 0;
    for (int h = 0; h < headers; h++) {
        const char *path = header_paths[h];
        int n = read_lines(path);
        for (int i = 0; i < n; i++) {
            for (const char *p = lines[i]; (p = strstr(p, "-E")) != NULL; p++) {
                char name[24];
                size_t k = 0;
                for (const char *q = p + 1;
                     k < sizeof name - 1 && ((*q >= 'A' && *q <= 'Z') || (*q >= '0' && *q <= '9'));
                     q++)
                    name[k++] = *q;
                name[k] = 0;
                if (k < 3)
                    continue; /* not an errno name ("-E" alone) */
                named++;
                bool found = false;
                for (int e = 1; e < 256 && !found; e++)
                    found = strcmp(known[e], name) == 0;
                if (!found) {
                    fprintf(stderr, "%s:%d: -%s has no name (cp_err_name says UNKNOWN)\n", path,
                            i + 1, name);
                    unknown++;
                }
            }
        }
    }
    fprintf(stderr, "%d error mentions in the headers, %d without a name\n", named, unknown);
    CHECK(named >= 50);
    CHECK_EQ(unknown, 0);
    CHECK(strcmp(cp_strerror(-EDEADLK), "Unknown error") != 0);
}

/* Errors a system call passes through that cport itself never makes (a file write's
 * -EDQUOT, -EROFS) are named and described too (glibc 2.32+); values no errno has are
 * "UNKNOWN" and "Unknown error", never NULL. */
TEST(passed_through_errors_have_names_and_texts)
{
#if defined(__GLIBC__) && (__GLIBC__ > 2 || __GLIBC_MINOR__ >= 32)
    CHECK(strcmp(cp_err_name(-EDQUOT), "EDQUOT") == 0);
    CHECK(strcmp(cp_err_name(EROFS), "EROFS") == 0);
    CHECK(strcmp(cp_strerror(-EROFS), "Read-only file system") == 0);
    CHECK(strcmp(cp_strerror(-EFBIG), "File too large") == 0);
#endif
    CHECK(strcmp(cp_err_name(-4000), "UNKNOWN") == 0);
    CHECK(strcmp(cp_strerror(-4000), "Unknown error") == 0);
    CHECK(strcmp(cp_strerror(0), "Success") == 0);
}

/* The README's first program builds against the installed library: `cmake --install` into
 * a fresh prefix (not the configured one: the .pc file must name paths relative to where
 * it lies), then cc -Wall -Wextra -Werror with `pkg-config --cflags --libs cport` from
 * there, and the program links. Normal builds only: a sanitizer build's library needs its
 * runtime linked in too. */
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define API_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define API_SANITIZED 1
#endif
#endif

TEST(the_readme_program_builds_against_the_installed_library)
{
#ifdef API_SANITIZED
    SKIP("a sanitizer build's library needs its runtime: checked in the normal build");
#else
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    CHECK(n > 0);
    exe[n] = 0;
    char *bin = strstr(exe, "/bin/test_api");
    CHECK(bin != NULL);
    *bin = 0; /* the build directory */
    const char *root = cpt_source_root();
    CHECK(root != NULL);
    char cmd[4 * PATH_MAX];
    snprintf(cmd, sizeof cmd,
             "set -e; d=$(mktemp -d); trap 'rm -rf \"$d\"' EXIT;"
             "cmake --install '%s' --prefix \"$d/prefix\" >/dev/null;"
             "awk '/^## A first program/{f=1} f&&/^```c/{p=1;next} p&&/^```/{exit} p'"
             " '%s/README.md' >\"$d/first.c\";"
             "test -s \"$d/first.c\";"
             "pc=$(dirname \"$(find \"$d/prefix\" -name cport.pc)\");"
             "cc -std=c11 -Wall -Wextra -Werror \"$d/first.c\" -o \"$d/first\""
             " $(PKG_CONFIG_PATH=\"$pc\" pkg-config --cflags --libs cport);"
             "test -x \"$d/first\"",
             exe, root);
    int st = system(cmd);
    CHECK(WIFEXITED(st));
    CHECK_EQ(WEXITSTATUS(st), 0);
#endif
}
