/* herd's C ABI end to end: load a bundle, generate from token ids, text and an image, read an error, free. */
#include <stdio.h>
#include <string.h>

#include "herd.h"

static int on_token(int64_t token, const char *text, void *user_data) {
    int *count = (int *)user_data;
    (*count)++;
    printf("token %lld %s\n", (long long)token, text);
    return 0;
}

static int stop_after_two(int64_t token, const char *text, void *user_data) {
    (void)token;
    (void)text;
    int *count = (int *)user_data;
    return ++(*count) >= 2;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s BUNDLE IMAGE\n", argv[0]);
        return 64;
    }
    char *error = NULL;
    if (herd_bundle_verify(argv[1], &error) != 0) {
        fprintf(stderr, "verify failed: %s\n", error);
        herd_string_free(error);
        return 6;
    }
    if (herd_bundle_verify("/nonexistent/bundle", &error) != -1 || error == NULL) {
        fprintf(stderr, "verifying a missing bundle must fail with a message\n");
        return 7;
    }
    herd_string_free(error);
    error = NULL;
    HerdModel *model = herd_model_load(argv[1], &error);
    if (model == NULL) {
        fprintf(stderr, "load failed: %s\n", error);
        herd_string_free(error);
        return 1;
    }
    int64_t ids[] = {5, 6, 7};
    int count = 0;
    int n = herd_generate_ids(model, ids, 3, 8, on_token, &count, &error);
    if (n < 1 || n != count) {
        fprintf(stderr, "generate_ids: %d tokens, %d callbacks, error %s\n", n, count, error ? error : "-");
        return 2;
    }
    count = 0;
    n = herd_generate_text(model, "Hello, world!", 1, 8, stop_after_two, &count, &error);
    if (n != 2) {
        fprintf(stderr, "generate_text: expected to stop after 2 tokens, got %d (%s)\n", n, error ? error : "-");
        return 3;
    }
    const char *images[] = {argv[2]};
    count = 0;
    n = herd_generate_images(model, "What is in <|image|>?", images, 1, 4, stop_after_two, &count, &error);
    if (n != 2) {
        fprintf(stderr, "generate_images: expected to stop after 2 tokens, got %d (%s)\n", n, error ? error : "-");
        return 6;
    }
    const char *broken[] = {"/nonexistent/image.png"};
    if (herd_generate_images(model, "hi", broken, 1, 4, NULL, NULL, &error) != -1 || error == NULL ||
        strstr(error, "image.png") == NULL) {
        fprintf(stderr, "a missing image must fail with a message naming it\n");
        return 7;
    }
    herd_string_free(error);
    error = NULL;
    if (herd_model_load("/nonexistent/bundle", &error) != NULL || error == NULL || strstr(error, "manifest.json") == NULL) {
        fprintf(stderr, "a missing bundle must fail with a message\n");
        return 4;
    }
    printf("error: %s\n", error);
    herd_string_free(error);
    error = NULL;
    if (herd_generate_ids(NULL, ids, 3, 1, NULL, NULL, &error) != -1 || error == NULL) {
        fprintf(stderr, "a NULL model must fail with a message\n");
        return 5;
    }
    herd_string_free(error);
    herd_model_free(model);
    printf("ok\n");
    return 0;
}
