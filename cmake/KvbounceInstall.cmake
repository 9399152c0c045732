include(GNUInstallDirs)
include(CMakePackageConfigHelpers)
get_property(kvbounce_modules GLOBAL PROPERTY KVBOUNCE_MODULES)
install(TARGETS kvbounce_core ${kvbounce_modules} EXPORT kvbounceTargets
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR})
install(DIRECTORY ${PROJECT_SOURCE_DIR}/include/kvbounce
        DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(EXPORT kvbounceTargets NAMESPACE kvbounce:: FILE kvbounceTargets.cmake
        DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/kvbounce)
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/kvbounceConfig.cmake.in
  ${PROJECT_BINARY_DIR}/kvbounceConfig.cmake
  INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/kvbounce)
write_basic_package_version_file(${PROJECT_BINARY_DIR}/kvbounceConfigVersion.cmake
  COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/kvbounceConfig.cmake
              ${PROJECT_BINARY_DIR}/kvbounceConfigVersion.cmake
        DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/kvbounce)
if(TARGET kvbounce)
  install(TARGETS kvbounce RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
  # `kvbounce sweep` finds its plot script at ../share/kvbounce from the binary.
  install(PROGRAMS ${PROJECT_SOURCE_DIR}/tools/plot_sweep.py
          DESTINATION ${CMAKE_INSTALL_DATADIR}/kvbounce)
endif()
